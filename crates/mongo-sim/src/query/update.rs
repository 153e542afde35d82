//! Updates: operator updates (`$set`, `$inc`, ...), replacements, pipeline updates, upsert
//! seeds, storage validation and the v2-oplog-style diff that becomes a change stream's
//! `updateDescription`.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use bson::{Bson, Document};

use super::aggregate::{apply_update_pipeline, PipelineContext};
use super::compare::{
    array_bson_size, binary_equal, bson_value_size, compare_values, decimal_digits,
    document_bson_size, documents_binary_equal, is_number, type_name, values_equal,
};
use super::expr::{num_add, num_mul};
use super::matcher::{CompiledRegex, Matcher, ValueMatcher};
pub use super::path::{dotted, PathPart};
use super::path::{get_path, get_path_mut, parse_index, path_traverses_array, set_path};
use crate::error::{codes, CommandError, CommandResult};

/// A parsed `u` field of an update statement.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateSpec {
    Operators(Document),
    Pipeline(Vec<Document>),
    Replacement(Document),
}

const MODIFIERS: &[&str] = &[
    "$set",
    "$unset",
    "$inc",
    "$mul",
    "$min",
    "$max",
    "$rename",
    "$setOnInsert",
    "$push",
    "$pull",
    "$pullAll",
    "$addToSet",
    "$pop",
    "$currentDate",
    "$bit",
];

impl UpdateSpec {
    /// Classifies and validates an update: a document whose first key starts with `$` is an
    /// operator update, an array is a pipeline, anything else is a replacement.
    pub fn parse(u: &Bson) -> CommandResult<UpdateSpec> {
        match u {
            Bson::Array(stages) => {
                let mut out = Vec::with_capacity(stages.len());
                for s in stages {
                    match s {
                        Bson::Document(d) => out.push(d.clone()),
                        _ => {
                            return Err(CommandError::failed_to_parse(
                                "Each element of the 'pipeline' array must be an object",
                            ))
                        }
                    }
                }
                Ok(UpdateSpec::Pipeline(out))
            }
            Bson::Document(d) => {
                let is_ops = d.keys().next().is_some_and(|k| k.starts_with('$'));
                if !is_ops {
                    return Ok(UpdateSpec::Replacement(d.clone()));
                }
                for (k, v) in d {
                    if !MODIFIERS.contains(&k.as_str()) {
                        return Err(CommandError::failed_to_parse(format!(
                            "Unknown modifier: {k}. Expected a valid update modifier or pipeline-style update specified as an array"
                        )));
                    }
                    if !matches!(v, Bson::Document(_)) {
                        return Err(CommandError::failed_to_parse(format!(
                            "Modifiers operate on fields but we found type {} instead. For example: {{$mod: {{<field>: ...}}}} not {{{k}: {}}}",
                            type_name_long(v),
                            server_repr(v)
                        )));
                    }
                }
                Ok(UpdateSpec::Operators(d.clone()))
            }
            other => Err(CommandError::failed_to_parse(format!(
                "Update argument must be either an object or an array, not {}",
                type_name(other)
            ))),
        }
    }
}

/// Inputs an update needs besides the document.
#[derive(Debug, Clone)]
pub struct UpdateContext {
    /// True when the update is being applied to a new upsert document (`$setOnInsert` runs).
    pub is_upsert_insert: bool,
    /// `$currentDate` with `date`, `$$NOW`.
    pub now: bson::DateTime,
    /// `$currentDate` with `timestamp`, `$$CLUSTER_TIME`, zero timestamps in replacements.
    pub now_ts: bson::Timestamp,
    /// `arrayFilters`: the filters of the `$[<identifier>]` paths.
    pub array_filters: Vec<Document>,
    /// Command-level `let` variables (and a statement's constants `c`), for pipeline updates.
    pub lets: std::sync::Arc<Vec<(String, Bson)>>,
}

impl UpdateContext {
    pub fn new(now: bson::DateTime, now_ts: bson::Timestamp) -> Self {
        UpdateContext {
            is_upsert_insert: false,
            now,
            now_ts,
            array_filters: Vec::new(),
            lets: Default::default(),
        }
    }
}

/// Applies an update and returns the new document.
pub fn apply_update(
    original: &Document,
    spec: &UpdateSpec,
    ctx: &UpdateContext,
) -> CommandResult<Document> {
    match resolve_array_updates(original, spec, ctx)? {
        Some(concrete) => apply_resolved(original, &concrete, ctx),
        None => apply_resolved(original, spec, ctx),
    }
}

/// `arrayFilters` and the all-positional `$[]` / filtered `$[<identifier>]` paths, resolved
/// against the document being updated: the same operators on the concrete array-element
/// paths they denote (`None`: nothing to resolve).
fn resolve_array_updates(
    original: &Document,
    spec: &UpdateSpec,
    ctx: &UpdateContext,
) -> CommandResult<Option<UpdateSpec>> {
    let ops = match spec {
        UpdateSpec::Operators(ops) => ops,
        UpdateSpec::Pipeline(_) if !ctx.array_filters.is_empty() => {
            return Err(CommandError::failed_to_parse(
                "arrayFilters may not be specified for pipeline-style updates",
            ))
        }
        UpdateSpec::Replacement(_) if !ctx.array_filters.is_empty() => {
            return Err(CommandError::failed_to_parse(
                "Cannot use array filters with replacement-style updates",
            ))
        }
        _ => return Ok(None),
    };
    let positional = |p: &str| {
        p.split('.')
            .any(|c| c.starts_with("$[") && c.ends_with(']'))
    };
    let any_positional = ops.values().any(|f| match f {
        Bson::Document(f) => f.keys().any(|k| positional(k)),
        _ => false,
    });
    if ctx.array_filters.is_empty() && !any_positional {
        return Ok(None);
    }
    let filters = parse_array_filters(&ctx.array_filters)?;
    let mut used = vec![false; filters.len()];
    let mut out = Document::new();
    for (op, fields) in ops {
        let Bson::Document(fields) = fields else {
            // Malformed: let the operator parser report it.
            return Ok(None);
        };
        let mut concrete = Document::new();
        for (path, arg) in fields {
            if !positional(path) {
                concrete.insert(path.clone(), arg.clone());
                continue;
            }
            if op == "$rename" {
                return Err(CommandError::bad_value(format!(
                    "The source field for $rename may not be dynamic: {path}"
                )));
            }
            let parts: Vec<&str> = path.split('.').collect();
            let mut paths = Vec::new();
            expand_path(
                &Bson::Document(original.clone()),
                &parts,
                0,
                &mut Vec::new(),
                &filters,
                &mut used,
                path,
                &mut paths,
            )?;
            for p in paths {
                let p = p.join(".");
                if concrete.contains_key(&p) {
                    return Err(CommandError::new(
                        codes::CONFLICTING_UPDATE_OPERATORS,
                        format!("Updating the path '{p}' would create a conflict at '{p}'"),
                    ));
                }
                concrete.insert(p, arg.clone());
            }
        }
        // An operator whose positional paths matched nothing updates nothing.
        if !concrete.is_empty() {
            out.insert(op.clone(), concrete);
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(CommandError::failed_to_parse(format!(
            "The array filter for identifier '{}' was not used in the update {}",
            filters[i].0,
            server_repr(&Bson::Document(ops.clone()))
        )));
    }
    Ok(Some(UpdateSpec::Operators(out)))
}

/// The identifier of each array filter (the first component of its top-level fields) and its
/// matcher, which is applied to `{<identifier>: element}`.
fn parse_array_filters(filters: &[Document]) -> CommandResult<Vec<(String, Matcher)>> {
    fn identifiers(filter: &Document, out: &mut Vec<String>) {
        for (k, v) in filter {
            match (k.as_str(), v) {
                ("$and" | "$or" | "$nor", Bson::Array(a)) => {
                    for f in a {
                        if let Bson::Document(f) = f {
                            identifiers(f, out);
                        }
                    }
                }
                _ => out.push(k.split('.').next().unwrap_or("").to_string()),
            }
        }
    }
    let mut out: Vec<(String, Matcher)> = Vec::new();
    for f in filters {
        let mut ids = Vec::new();
        identifiers(f, &mut ids);
        ids.dedup();
        let id = match ids.as_slice() {
            [] => {
                return Err(CommandError::failed_to_parse(
                    "Error parsing array filter :: caused by :: Cannot use an expression without a top-level field name in arrayFilters",
                ))
            }
            [one] => one.clone(),
            [a, b, ..] => {
                return Err(CommandError::failed_to_parse(format!(
                    "Error parsing array filter :: caused by :: Expected a single top-level field name, found '{a}' and '{b}'"
                )))
            }
        };
        let mut chars = id.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_alphanumeric());
        if !valid {
            return Err(CommandError::bad_value(format!(
                "Error parsing array filter :: caused by :: The top-level field name must be an alphanumeric string beginning with a lowercase letter, found '{id}'"
            )));
        }
        if out.iter().any(|(i, _)| *i == id) {
            return Err(CommandError::failed_to_parse(format!(
                "Found multiple array filters with the same top-level field name {id}"
            )));
        }
        out.push((id, Matcher::new(f)?));
    }
    Ok(out)
}

/// Expands `parts[i..]` below `value` (reached by `prefix`) into concrete paths.
#[allow(clippy::too_many_arguments)]
fn expand_path(
    value: &Bson,
    parts: &[&str],
    i: usize,
    prefix: &mut Vec<String>,
    filters: &[(String, Matcher)],
    used: &mut [bool],
    full: &str,
    out: &mut Vec<Vec<String>>,
) -> CommandResult<()> {
    let Some(part) = parts.get(i) else {
        out.push(prefix.clone());
        return Ok(());
    };
    if !(part.starts_with("$[") && part.ends_with(']')) {
        let next = match value {
            Bson::Document(d) => d.get(*part),
            Bson::Array(a) => parse_index(part).and_then(|ix| a.get(ix)),
            _ => None,
        };
        prefix.push(part.to_string());
        match next {
            Some(next) => expand_path(next, parts, i + 1, prefix, filters, used, full, out)?,
            None if parts[i + 1..].iter().any(|p| p.starts_with("$[")) => {
                return Err(CommandError::bad_value(format!(
                    "The path '{}' must exist in the document in order to apply array updates.",
                    prefix.join(".")
                )))
            }
            None => {
                let mut p = prefix.clone();
                p.extend(parts[i + 1..].iter().map(|s| s.to_string()));
                out.push(p);
            }
        }
        prefix.pop();
        return Ok(());
    }
    let id = &part[2..part.len() - 1];
    let filter = if id.is_empty() {
        None
    } else {
        let Some(ix) = filters.iter().position(|(f, _)| f == id) else {
            return Err(CommandError::bad_value(format!(
                "No array filter found for identifier '{id}' in path '{full}'"
            )));
        };
        used[ix] = true;
        Some(&filters[ix].1)
    };
    let Bson::Array(arr) = value else {
        return Err(CommandError::bad_value(format!(
            "Cannot apply array updates to non-array element {}: {}",
            prefix.last().map(String::as_str).unwrap_or(""),
            server_repr(value)
        )));
    };
    for (ix, elem) in arr.iter().enumerate() {
        if let Some(m) = filter {
            let mut wrapped = Document::new();
            wrapped.insert(id, elem.clone());
            if !m.try_matches(&wrapped)? {
                continue;
            }
        }
        prefix.push(ix.to_string());
        expand_path(elem, parts, i + 1, prefix, filters, used, full, out)?;
        prefix.pop();
    }
    Ok(())
}

fn apply_resolved(
    original: &Document,
    spec: &UpdateSpec,
    ctx: &UpdateContext,
) -> CommandResult<Document> {
    match spec {
        UpdateSpec::Replacement(r) => apply_replacement(original, r, ctx, false),
        UpdateSpec::Operators(ops) => apply_operators(original, ops, ctx),
        UpdateSpec::Pipeline(stages) => {
            let pctx = PipelineContext {
                now: ctx.now,
                cluster_time: Some(ctx.now_ts),
                lets: std::sync::Arc::clone(&ctx.lets),
            };
            let transformed = apply_update_pipeline(original, stages, &pctx)?;
            apply_replacement(original, &transformed, ctx, true)
        }
    }
}

fn apply_replacement(
    original: &Document,
    replacement: &Document,
    ctx: &UpdateContext,
    from_pipeline: bool,
) -> CommandResult<Document> {
    let mut out = Document::new();
    let has_id = replacement.contains_key("_id");
    if !has_id {
        if let Some(id) = original.get("_id") {
            out.insert("_id", id.clone());
        }
    }
    for (k, v) in replacement {
        let v = match v {
            // Top-level zero timestamps are replaced with the current cluster time (replacement
            // style only; pipeline results are stored as produced).
            Bson::Timestamp(ts) if !from_pipeline && ts.time == 0 && ts.increment == 0 => {
                Bson::Timestamp(ctx.now_ts)
            }
            other => other.clone(),
        };
        out.insert(k.clone(), v);
    }
    validate_updated_document(&out, from_pipeline || ctx.is_upsert_insert)?;
    if has_id {
        if let (Some(old), Some(new)) = (original.get("_id"), out.get("_id")) {
            if !super::compare::values_equal_simple(old, new) {
                return Err(CommandError::new(
                    codes::IMMUTABLE_FIELD,
                    format!(
                        "After applying the update, the (immutable) field '_id' was found to have been altered to _id: {}",
                        server_repr(new)
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Checks a document about to be stored by a replacement or pipeline update: `_id` may not be
/// an array, regex or undefined (InvalidIdField 53); unless `allow_top_level_dollar` (pipeline
/// updates, and the document an upsert inserts, validated as an insert), every top-level
/// `$`-prefixed field is checked as the server's `storage_validation` does (see
/// [`check_top_level_dollar_field`]). Nested `$`-prefixed fields are legal since 5.0.
pub fn validate_updated_document(
    doc: &Document,
    allow_top_level_dollar: bool,
) -> CommandResult<()> {
    if let Some(id) = doc.get("_id") {
        check_id(id, |t| format!("The '_id' value cannot be of type {t}"))?;
    }
    if !allow_top_level_dollar {
        for (i, k) in doc.keys().enumerate() {
            if k.starts_with('$') {
                check_top_level_dollar_field(doc, i)?;
            }
        }
    }
    Ok(())
}

/// The server's `validateDollarPrefixElement` for the top-level field at `index` of `doc`
/// (whose name starts with `$`): a DBRef (`$ref` (a string) followed by `$id`, then an
/// optional `$db` (a string)) is valid; a misplaced DBRef field → InvalidDBRef 55; any other
/// name → DollarPrefixedFieldName 52.
fn check_top_level_dollar_field(doc: &Document, index: usize) -> CommandResult<()> {
    let keys: Vec<&str> = doc.keys().map(String::as_str).collect();
    let dbref = |msg: String| Err(CommandError::new(codes::INVALID_DBREF, msg));
    let mut at = index;
    if keys[at] == "$db" {
        let v = &doc[keys[at]];
        if !matches!(v, Bson::String(_)) {
            return dbref(format!(
                "The DBRef $db field must be a String, not a {}",
                type_name(v)
            ));
        }
        if at == 0 || keys[at - 1] != "$id" {
            return dbref("Found $db field without a $id before it, which is invalid.".into());
        }
        at -= 1;
    }
    if keys[at] == "$id" {
        if at == 0 || keys[at - 1] != "$ref" {
            return dbref("Found $id field without a $ref before it, which is invalid.".into());
        }
        at -= 1;
    }
    if keys[at] == "$ref" {
        let v = &doc[keys[at]];
        if !matches!(v, Bson::String(_)) {
            return dbref(format!(
                "The DBRef $ref field must be a String, not a {}",
                type_name(v)
            ));
        }
        if keys.get(at + 1) != Some(&"$id") {
            return dbref("The DBRef $ref field must be followed by a $id field".into());
        }
        return Ok(());
    }
    let k = keys[index];
    Err(CommandError::new(
        codes::DOLLAR_PREFIXED_FIELD_NAME,
        format!("The dollar ($) prefixed field '{k}' in '{k}' is not allowed in the context of an update's replacement document. Consider using an aggregation pipeline with $replaceWith."),
    ))
}

/// The storage check of an operator update's result: as the server validates only the
/// elements an operator modified or created (`ModifierNode::validateUpdate`), a top-level
/// `$`-prefixed field is checked only when the update created it or an operator path (or a
/// `$rename` target) names exactly that field and changed its value. Fields already stored
/// (inserted with `$` names, legal since 5.0) and `a.$b`-style nested paths pass. The
/// document an upsert inserts is validated as an insert instead.
fn validate_operator_result(
    original: &Document,
    doc: &Document,
    ops: &Document,
    ctx: &UpdateContext,
) -> CommandResult<()> {
    if let Some(id) = doc.get("_id") {
        check_id(id, |t| format!("The '_id' value cannot be of type {t}"))?;
    }
    if ctx.is_upsert_insert {
        return Ok(());
    }
    let names_field = |k: &str| {
        ops.iter().any(|(op, args)| match args {
            Bson::Document(a) => a.iter().any(|(path, arg)| {
                path == k || (op == "$rename" && matches!(arg, Bson::String(to) if to == k))
            }),
            _ => false,
        })
    };
    for (i, (k, v)) in doc.iter().enumerate() {
        if !k.starts_with('$') {
            continue;
        }
        let touched = match original.get(k) {
            None => true,
            Some(old) => old != v && names_field(k),
        };
        if touched {
            check_top_level_dollar_field(doc, i)?;
        }
    }
    Ok(())
}

/// Checks a document about to be inserted, with the server's `fixDocumentForInsert` rules
/// and codes (5.0+): `$`-prefixed and dotted field names are legal at every level, the
/// top level included; `_id` may not be a regex, undefined or an array (BadValue: "can't use
/// a regex for _id", "can't use a undefined for _id", "can't use an array for _id"); an `_id`
/// sub-document may not contain `$`-prefixed field names at any depth (DollarPrefixedFieldName
/// 52; DBRef names excepted).
pub fn validate_stored_document(doc: &Document) -> CommandResult<()> {
    for (k, v) in doc {
        if k == "_id" {
            let msg = match v {
                Bson::RegularExpression(_) => Some("can't use a regex for _id"),
                Bson::Undefined => Some("can't use a undefined for _id"),
                Bson::Array(_) => Some("can't use an array for _id"),
                _ => None,
            };
            if let Some(m) = msg {
                return Err(CommandError::bad_value(m));
            }
            if let Bson::Document(d) = v {
                if let Some(bad) = find_dollar_field(d) {
                    return Err(CommandError::new(
                        codes::DOLLAR_PREFIXED_FIELD_NAME,
                        format!("_id fields may not contain '$'-prefixed fields: {bad} is not valid for storage."),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn find_dollar_field(d: &Document) -> Option<String> {
    for (k, v) in d {
        if k.starts_with('$') && !matches!(k.as_str(), "$ref" | "$id" | "$db") {
            return Some(k.clone());
        }
        if let Bson::Document(sub) = v {
            if let Some(x) = find_dollar_field(sub) {
                return Some(x);
            }
        }
    }
    None
}

/// The document the server stores for an insert (`fixDocumentForInsert`), and for the
/// insert an upsert makes (validated as an insert, so top-level `$`-prefixed fields pass):
/// validated as [`validate_stored_document`], `_id` moved first (a new ObjectId when absent),
/// top-level `Timestamp(0, 0)` values replaced with `now_ts`.
pub fn prepare_for_insert(doc: &Document, now_ts: bson::Timestamp) -> CommandResult<Document> {
    validate_stored_document(doc)?;
    let mut out = Document::new();
    match doc.get("_id") {
        Some(id) => out.insert("_id", id.clone()),
        None => out.insert("_id", bson::oid::ObjectId::new()),
    };
    for (k, v) in doc {
        if k == "_id" {
            continue;
        }
        match v {
            Bson::Timestamp(ts) if ts.time == 0 && ts.increment == 0 => {
                out.insert(k.clone(), Bson::Timestamp(now_ts));
            }
            other => {
                out.insert(k.clone(), other.clone());
            }
        }
    }
    Ok(out)
}

fn check_id(id: &Bson, msg: impl Fn(&str) -> String) -> CommandResult<()> {
    let t = match id {
        Bson::Array(_) => "array",
        Bson::RegularExpression(_) => "regex",
        Bson::Undefined => "undefined",
        _ => return Ok(()),
    };
    Err(CommandError::new(codes::INVALID_ID_FIELD, msg(t)))
}

/// Returns a copy with `_id` as the first field (as inserts store it).
pub fn with_id_first(doc: &Document) -> Document {
    match doc.get("_id") {
        None => doc.clone(),
        Some(id) => {
            let mut out = Document::new();
            out.insert("_id", id.clone());
            for (k, v) in doc {
                if k != "_id" {
                    out.insert(k.clone(), v.clone());
                }
            }
            out
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operator updates
// ---------------------------------------------------------------------------------------------

struct Op<'a> {
    op: &'a str,
    path: &'a str,
    parts: Vec<&'a str>,
    arg: &'a Bson,
}

fn validate_path(path: &str) -> CommandResult<()> {
    if path.is_empty() {
        return Err(CommandError::new(
            codes::EMPTY_FIELD_NAME,
            "An empty update path is not valid.",
        ));
    }
    if path.split('.').any(|p| p.is_empty()) {
        return Err(CommandError::new(
            codes::EMPTY_FIELD_NAME,
            format!("The update path '{path}' contains an empty field name, which is not allowed."),
        ));
    }
    for p in path.split('.') {
        if p == "$" || p.starts_with("$[") {
            // `$[]` / `$[<id>]` are resolved to concrete paths before this check; what is
            // left is the query-positional `$`, which the simulator does not implement.
            return Err(CommandError::new(
                codes::COMMAND_NOT_SUPPORTED,
                format!("mongo-sim does not implement the positional operator $ (path '{path}')"),
            ));
        }
    }
    Ok(())
}

fn is_prefix(a: &[&str], b: &[&str]) -> bool {
    a.len() <= b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

fn apply_operators(
    original: &Document,
    ops: &Document,
    ctx: &UpdateContext,
) -> CommandResult<Document> {
    // Collect and check for conflicts in the order the server builds its update tree.
    let mut list: Vec<Op> = Vec::new();
    let mut registered: Vec<Vec<&str>> = Vec::new();
    fn register<'a>(
        registered: &mut Vec<Vec<&'a str>>,
        parts: Vec<&'a str>,
        full: &str,
    ) -> CommandResult<()> {
        for r in registered.iter() {
            if is_prefix(r, &parts) || is_prefix(&parts, r) {
                let shorter = if r.len() <= parts.len() { r } else { &parts };
                return Err(CommandError::new(
                    codes::CONFLICTING_UPDATE_OPERATORS,
                    format!(
                        "Updating the path '{full}' would create a conflict at '{}'",
                        shorter.join(".")
                    ),
                ));
            }
        }
        registered.push(parts);
        Ok(())
    }
    for (op, fields) in ops {
        let Bson::Document(fields) = fields else {
            return Err(CommandError::failed_to_parse(format!(
                "Modifiers operate on fields but we found type {} instead. For example: {{$mod: {{<field>: ...}}}} not {{{op}: {}}}",
                type_name_long(fields),
                server_repr(fields)
            )));
        };
        if !MODIFIERS.contains(&op.as_str()) {
            return Err(CommandError::failed_to_parse(format!(
                "Unknown modifier: {op}. Expected a valid update modifier or pipeline-style update specified as an array"
            )));
        }
        for (path, arg) in fields {
            validate_path(path)?;
            if op == "$rename" {
                let Bson::String(to) = arg else {
                    return Err(CommandError::bad_value(format!(
                        "The 'to' field for $rename must be a string: {path}: {}",
                        server_repr(arg)
                    )));
                };
                validate_path(to)?;
                if to == path {
                    return Err(CommandError::bad_value(format!(
                        "The source and target field for $rename must differ: {path}: \"{to}\""
                    )));
                }
                let (sp, tp): (Vec<&str>, Vec<&str>) =
                    (path.split('.').collect(), to.split('.').collect());
                if is_prefix(&sp, &tp) || is_prefix(&tp, &sp) {
                    return Err(CommandError::bad_value(format!(
                        "The source and target field for $rename must not be on the same path: {path}: \"{to}\""
                    )));
                }
                register(&mut registered, tp, to)?;
                register(&mut registered, sp, path)?;
            } else {
                register(&mut registered, path.split('.').collect(), path)?;
            }
            list.push(Op {
                op,
                path,
                parts: path.split('.').collect(),
                arg,
            });
        }
    }
    // The server applies modifications in field-name order at each level of the path tree.
    list.sort_by(|a, b| {
        let key_a = if a.op == "$rename" {
            rename_target(a)
        } else {
            a.parts.clone()
        };
        let key_b = if b.op == "$rename" {
            rename_target(b)
        } else {
            b.parts.clone()
        };
        key_a
            .iter()
            .map(|s| s.as_bytes())
            .cmp(key_b.iter().map(|s| s.as_bytes()))
    });

    let mut doc = original.clone();
    for op in &list {
        apply_one(&mut doc, original, op, ctx)?;
    }

    if let Some(old_id) = original.get("_id") {
        match doc.get("_id") {
            Some(new_id) if super::compare::values_equal_simple(old_id, new_id) => {}
            _ => {
                return Err(CommandError::new(
                    codes::IMMUTABLE_FIELD,
                    "Performing an update on the path '_id' would modify the immutable field '_id'",
                ))
            }
        }
    }
    validate_operator_result(original, &doc, ops, ctx)?;
    Ok(doc)
}

fn rename_target<'a>(op: &Op<'a>) -> Vec<&'a str> {
    match op.arg {
        Bson::String(s) => s.split('.').collect(),
        _ => op.parts.clone(),
    }
}

fn id_repr(doc: &Document) -> String {
    match doc.get("_id") {
        Some(id) => format!("{{_id: {}}}", server_repr(id)),
        None => "{}".to_string(),
    }
}

fn zero_like(b: &Bson) -> Bson {
    match b {
        Bson::Int32(_) => Bson::Int32(0),
        Bson::Int64(_) => Bson::Int64(0),
        Bson::Double(_) => Bson::Double(0.0),
        _ => super::expr::f64_to_decimal(0.0),
    }
}

fn last_name<'a>(op: &Op<'a>) -> &'a str {
    op.parts.last().copied().unwrap_or("")
}

fn apply_one(
    doc: &mut Document,
    original: &Document,
    op: &Op,
    ctx: &UpdateContext,
) -> CommandResult<()> {
    let path = op.path;
    match op.op {
        "$set" => set_path(doc, path, op.arg.clone()),
        "$setOnInsert" => {
            if ctx.is_upsert_insert {
                set_path(doc, path, op.arg.clone())
            } else {
                Ok(())
            }
        }
        "$unset" => {
            super::path::unset_path(doc, path);
            Ok(())
        }
        "$inc" | "$mul" => {
            let verb = if op.op == "$inc" {
                "increment"
            } else {
                "multiply"
            };
            if !is_number(op.arg) {
                return Err(CommandError::type_mismatch(format!(
                    "Cannot {verb} with non-numeric argument: {{{path}: {}}}",
                    server_repr(op.arg)
                )));
            }
            match get_path(doc, path) {
                None => {
                    let v = if op.op == "$inc" {
                        op.arg.clone()
                    } else {
                        zero_like(op.arg)
                    };
                    set_path(doc, path, v)
                }
                Some(cur) if is_number(cur) => {
                    let v = if op.op == "$inc" {
                        num_add(cur, op.arg)
                    } else {
                        num_mul(cur, op.arg)
                    };
                    set_path(doc, path, v)
                }
                Some(cur) => Err(CommandError::type_mismatch(format!(
                    "Cannot apply {} to a value of non-numeric type. {} has the field '{}' of non-numeric type {}",
                    op.op,
                    id_repr(original),
                    last_name(op),
                    type_name(cur)
                ))),
            }
        }
        "$min" | "$max" => match get_path(doc, path) {
            None => set_path(doc, path, op.arg.clone()),
            Some(cur) => {
                let o = compare_values(op.arg, cur);
                let replace = if op.op == "$min" {
                    o == Ordering::Less
                } else {
                    o == Ordering::Greater
                };
                if replace {
                    set_path(doc, path, op.arg.clone())
                } else {
                    Ok(())
                }
            }
        },
        "$currentDate" => {
            let v = match op.arg {
                Bson::Boolean(_) => Bson::DateTime(ctx.now),
                Bson::Document(d) => {
                    let t = d.get("$type");
                    let valid_keys = d.keys().all(|k| k == "$type");
                    match (t, valid_keys) {
                        (Some(Bson::String(s)), true) if s == "date" => Bson::DateTime(ctx.now),
                        (Some(Bson::String(s)), true) if s == "timestamp" => {
                            Bson::Timestamp(ctx.now_ts)
                        }
                        _ => {
                            return Err(CommandError::bad_value(
                                "The '$type' string field is required to be 'date' or 'timestamp': {$currentDate: {field : {$type: 'date'}}}",
                            ))
                        }
                    }
                }
                other => {
                    return Err(CommandError::bad_value(format!(
                        "{path} is not valid type for $currentDate. Please use a boolean ('true') or a $type expression ({{$type: 'timestamp/date'}}). {}",
                        server_repr(other)
                    )))
                }
            };
            set_path(doc, path, v)
        }
        "$rename" => {
            let Bson::String(to) = op.arg else {
                unreachable!("validated")
            };
            if path_traverses_array(doc, path) {
                return Err(CommandError::bad_value(format!(
                    "The source field cannot be an array element, '{path}' in doc with {}",
                    id_repr(original)
                )));
            }
            if path_traverses_array(doc, to) {
                return Err(CommandError::bad_value(format!(
                    "The destination field cannot be an array element, '{to}' in doc with {}",
                    id_repr(original)
                )));
            }
            let Some(v) = get_path(doc, path).cloned() else {
                return Ok(());
            };
            set_path(doc, to, v)?;
            super::path::unset_path(doc, path);
            Ok(())
        }
        "$push" => apply_push(doc, original, op),
        "$addToSet" => apply_add_to_set(doc, op),
        "$pop" => {
            let dir = match op.arg {
                b if is_number(b) => super::expr::num_to_f64(b),
                _ => f64::NAN,
            };
            if dir != 1.0 && dir != -1.0 {
                return Err(CommandError::failed_to_parse(format!(
                    "$pop expects 1 or -1, found: {}",
                    server_repr(op.arg)
                )));
            }
            match get_path_mut(doc, path) {
                None => Ok(()),
                Some(Bson::Array(a)) => {
                    if !a.is_empty() {
                        if dir == 1.0 {
                            a.pop();
                        } else {
                            a.remove(0);
                        }
                    }
                    Ok(())
                }
                Some(other) => Err(CommandError::type_mismatch(format!(
                    "Path '{path}' contains an element of non-array type '{}'",
                    type_name(other)
                ))),
            }
        }
        "$pull" => {
            let cond = PullCond::new(op.arg)?;
            match get_path_mut(doc, path) {
                None => Ok(()),
                Some(Bson::Array(a)) => {
                    a.retain(|e| !cond.matches(e));
                    Ok(())
                }
                Some(_) => Err(CommandError::bad_value(
                    "Cannot apply $pull to a non-array value",
                )),
            }
        }
        "$pullAll" => {
            let Bson::Array(vals) = op.arg else {
                return Err(CommandError::bad_value(format!(
                    "$pullAll requires an array argument but was given a {}",
                    type_name(op.arg)
                )));
            };
            match get_path_mut(doc, path) {
                None => Ok(()),
                Some(Bson::Array(a)) => {
                    a.retain(|e| !vals.iter().any(|v| values_equal(e, v)));
                    Ok(())
                }
                Some(_) => Err(CommandError::bad_value(
                    "Cannot apply $pull to a non-array value",
                )),
            }
        }
        "$bit" => apply_bit(doc, original, op),
        other => Err(CommandError::failed_to_parse(format!(
            "Unknown modifier: {other}. Expected a valid update modifier or pipeline-style update specified as an array"
        ))),
    }
}

enum PullCond {
    Equal(Bson),
    Regex(CompiledRegex),
    Value(ValueMatcher),
    Object(Matcher),
}

impl PullCond {
    fn new(arg: &Bson) -> CommandResult<PullCond> {
        Ok(match arg {
            Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
                let first = d.keys().next().expect("non-empty");
                if matches!(first.as_str(), "$and" | "$or" | "$nor" | "$expr") {
                    PullCond::Object(Matcher::new(d)?)
                } else {
                    PullCond::Value(Matcher::value_condition(d)?)
                }
            }
            Bson::Document(d) => PullCond::Object(Matcher::new(d)?),
            Bson::RegularExpression(r) => {
                PullCond::Regex(CompiledRegex::new(r.pattern.as_str(), r.options.as_str())?)
            }
            other => PullCond::Equal(other.clone()),
        })
    }

    fn matches(&self, e: &Bson) -> bool {
        match self {
            PullCond::Equal(v) => values_equal(e, v),
            PullCond::Regex(r) => r.matches_value(e),
            PullCond::Value(vm) => vm.matches(e),
            PullCond::Object(m) => match e {
                Bson::Document(d) => m.matches(d),
                _ => false,
            },
        }
    }
}

fn non_array_push_error(op: &Op, original: &Document, cur: &Bson) -> CommandError {
    CommandError::bad_value(format!(
        "The field '{}' must be an array but is of type {} in document {}",
        op.path,
        type_name(cur),
        id_repr(original)
    ))
}

fn int_arg(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) if f.fract() == 0.0 && f.is_finite() => Some(*f as i64),
        Bson::Decimal128(_) => {
            let f = super::expr::num_to_f64(v);
            (f.fract() == 0.0 && f.is_finite()).then_some(f as i64)
        }
        _ => None,
    }
}

enum PushSort {
    Whole(bool),
    Fields(Vec<(String, bool)>),
}

fn apply_push(doc: &mut Document, original: &Document, op: &Op) -> CommandResult<()> {
    let mut each: Vec<Bson> = vec![op.arg.clone()];
    let mut slice: Option<i64> = None;
    let mut position: Option<i64> = None;
    let mut sort: Option<PushSort> = None;
    if let Bson::Document(d) = op.arg {
        if d.contains_key("$each") {
            for (k, v) in d {
                match k.as_str() {
                    "$each" => match v {
                        Bson::Array(a) => each = a.clone(),
                        other => {
                            return Err(CommandError::bad_value(format!(
                                "The argument to $each in $push must be an array but it was of type: {}",
                                type_name_long(other)
                            )))
                        }
                    },
                    "$slice" => {
                        slice = Some(int_arg(v).ok_or_else(|| {
                            CommandError::bad_value(format!(
                                "The value for $slice must be an integer value but was given type: {}",
                                type_name_long(v)
                            ))
                        })?)
                    }
                    "$position" => {
                        position = Some(int_arg(v).ok_or_else(|| {
                            CommandError::bad_value(format!(
                                "The value for $position must be an integer value, not of type: {}",
                                type_name_long(v)
                            ))
                        })?)
                    }
                    "$sort" => sort = Some(parse_push_sort(v)?),
                    other => {
                        return Err(CommandError::bad_value(format!(
                            "Unrecognized clause in $push: {other}"
                        )))
                    }
                }
            }
        }
    }
    let arr: &mut Vec<Bson> = match get_path_mut(doc, op.path) {
        None => {
            set_path(doc, op.path, Bson::Array(Vec::new()))?;
            match get_path_mut(doc, op.path) {
                Some(Bson::Array(a)) => a,
                _ => unreachable!("just created"),
            }
        }
        Some(Bson::Array(a)) => a,
        Some(other) => {
            let other = other.clone();
            return Err(non_array_push_error(op, original, &other));
        }
    };
    let len = arr.len() as i64;
    let pos = match position {
        None => len,
        Some(p) if p < 0 => (len + p).max(0),
        Some(p) => p.min(len),
    } as usize;
    arr.splice(pos..pos, each);
    if let Some(s) = sort {
        match s {
            PushSort::Whole(asc) => arr.sort_by(|a, b| {
                let o = compare_values(a, b);
                if asc {
                    o
                } else {
                    o.reverse()
                }
            }),
            PushSort::Fields(fields) => arr.sort_by(|a, b| {
                for (f, asc) in &fields {
                    let va = match a {
                        Bson::Document(d) => get_path(d, f),
                        _ => None,
                    };
                    let vb = match b {
                        Bson::Document(d) => get_path(d, f),
                        _ => None,
                    };
                    let o = compare_values(va.unwrap_or(&Bson::Null), vb.unwrap_or(&Bson::Null));
                    let o = if *asc { o } else { o.reverse() };
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                Ordering::Equal
            }),
        }
    }
    if let Some(s) = slice {
        if s >= 0 {
            arr.truncate(s as usize);
        } else {
            let keep = (-s) as usize;
            if arr.len() > keep {
                let drop = arr.len() - keep;
                arr.drain(..drop);
            }
        }
    }
    Ok(())
}

fn parse_push_sort(v: &Bson) -> CommandResult<PushSort> {
    let dir = |b: &Bson| -> CommandResult<bool> {
        match int_arg(b) {
            Some(1) => Ok(true),
            Some(-1) => Ok(false),
            _ => Err(CommandError::bad_value(
                "The $sort element value must be either 1 or -1",
            )),
        }
    };
    match v {
        Bson::Document(d) => {
            if d.is_empty() {
                return Err(CommandError::bad_value(
                    "The $sort pattern is empty when it should be a set of fields.",
                ));
            }
            let mut fields = Vec::new();
            for (k, b) in d {
                fields.push((k.clone(), dir(b)?));
            }
            Ok(PushSort::Fields(fields))
        }
        other if is_number(other) => Ok(PushSort::Whole(dir(other)?)),
        _ => Err(CommandError::bad_value(
            "The $sort is invalid: use 1/-1 to sort the whole element, or {field:1/-1} to sort embedded fields",
        )),
    }
}

fn apply_add_to_set(doc: &mut Document, op: &Op) -> CommandResult<()> {
    let vals: Vec<Bson> = match op.arg {
        Bson::Document(d) if d.contains_key("$each") => {
            if d.len() != 1 {
                let other = d.keys().find(|k| *k != "$each").expect("another key");
                return Err(CommandError::bad_value(format!(
                    "Found unexpected fields after $each in $addToSet: {}",
                    other
                )));
            }
            match d.get("$each") {
                Some(Bson::Array(a)) => a.clone(),
                Some(other) => {
                    return Err(CommandError::type_mismatch(format!(
                        "The argument to $each in $addToSet must be an array but it was of type {}",
                        type_name_long(other)
                    )))
                }
                None => unreachable!(),
            }
        }
        other => vec![other.clone()],
    };
    let arr: &mut Vec<Bson> = match get_path_mut(doc, op.path) {
        None => {
            set_path(doc, op.path, Bson::Array(Vec::new()))?;
            match get_path_mut(doc, op.path) {
                Some(Bson::Array(a)) => a,
                _ => unreachable!("just created"),
            }
        }
        Some(Bson::Array(a)) => a,
        Some(other) => {
            return Err(CommandError::bad_value(format!(
                "Cannot apply $addToSet to non-array field. Field named '{}' has non-array type {}",
                op.parts.last().copied().unwrap_or(""),
                type_name(other)
            )))
        }
    };
    for v in vals {
        if !arr.iter().any(|e| values_equal(e, &v)) {
            arr.push(v);
        }
    }
    Ok(())
}

fn apply_bit(doc: &mut Document, original: &Document, op: &Op) -> CommandResult<()> {
    let Bson::Document(spec) = op.arg else {
        return Err(CommandError::bad_value(format!(
            "The $bit modifier is not compatible with a {}. You must pass in an embedded document: {{$bit: {{field: {{and/or/xor: #}}}}",
            type_name(op.arg)
        )));
    };
    let mut cur = match get_path(doc, op.path) {
        None => Bson::Int32(0),
        Some(v @ (Bson::Int32(_) | Bson::Int64(_))) => v.clone(),
        Some(other) => {
            return Err(CommandError::bad_value(format!(
                "Cannot apply $bit to a value of non-integral type.{} has the field {} of non-integer type {}",
                id_repr(original),
                op.path,
                type_name(other)
            )))
        }
    };
    for (k, v) in spec {
        let operand = match v {
            Bson::Int32(_) | Bson::Int64(_) => v,
            _ => {
                return Err(CommandError::bad_value(format!(
                    "The $bit modifier field must be an Integer(32/64 bit); a '{}' is not supported here: {{{k}: {}}}",
                    type_name(v),
                    server_repr(v)
                )))
            }
        };
        let f = |a: i64, b: i64| -> CommandResult<i64> {
            Ok(match k.as_str() {
                "and" => a & b,
                "or" => a | b,
                "xor" => a ^ b,
                _ => {
                    return Err(CommandError::bad_value(format!(
                        "The $bit modifier only supports 'and', 'or', and 'xor', not '{k}' which is an unknown operator: {{{k}: {}}}",
                        server_repr(v)
                    )))
                }
            })
        };
        let as_i64 = |b: &Bson| match b {
            Bson::Int32(x) => *x as i64,
            Bson::Int64(x) => *x,
            _ => 0,
        };
        cur = match (&cur, operand) {
            (Bson::Int32(a), Bson::Int32(b)) => Bson::Int32(f(*a as i64, *b as i64)? as i32),
            (a, b) => Bson::Int64(f(as_i64(a), as_i64(b))?),
        };
    }
    set_path(doc, op.path, cur)
}

// ---------------------------------------------------------------------------------------------
// Upserts
// ---------------------------------------------------------------------------------------------

/// The document an upsert starts from: the filter's equality conditions (`{a: 1}`,
/// `{a: {$eq: 1}}`, single-element `$in`, inside `$and` or a single-child `$or`), with dotted
/// paths expanded. Other operators, regexes, `$nor` and `$expr` contribute nothing. Paths that
/// conflict are skipped here; [`try_upsert_seed`] reports them like the server.
pub fn upsert_seed(filter: &Document) -> Document {
    let mut eqs = Vec::new();
    collect_equalities(filter, &mut eqs);
    let mut out = Document::new();
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in &eqs {
        let parts: Vec<&str> = k.split('.').collect();
        let conflict = seen.iter().any(|s| {
            let sp: Vec<&str> = s.split('.').collect();
            is_prefix(&sp, &parts) || is_prefix(&parts, &sp)
        });
        if !conflict && set_path(&mut out, k, v.clone()).is_ok() {
            seen.push(k);
        }
    }
    out
}

/// Like [`upsert_seed`], but fails as the server does when equality paths collide:
/// NotSingleValueField (54) "cannot infer query fields to set, path 'a' is matched twice" or
/// "... both paths 'a.b' and 'a' are matched".
pub fn try_upsert_seed(filter: &Document) -> CommandResult<Document> {
    let mut eqs = Vec::new();
    collect_equalities(filter, &mut eqs);
    for (i, (k, _)) in eqs.iter().enumerate() {
        let parts: Vec<&str> = k.split('.').collect();
        for (prev, _) in &eqs[..i] {
            let pp: Vec<&str> = prev.split('.').collect();
            if pp == parts {
                return Err(CommandError::new(
                    codes::NOT_SINGLE_VALUE_FIELD,
                    format!("cannot infer query fields to set, path '{k}' is matched twice"),
                ));
            }
            if is_prefix(&pp, &parts) || is_prefix(&parts, &pp) {
                return Err(CommandError::new(
                    codes::NOT_SINGLE_VALUE_FIELD,
                    format!("cannot infer query fields to set, both paths '{k}' and '{prev}' are matched"),
                ));
            }
        }
    }
    let mut out = Document::new();
    for (k, v) in eqs {
        set_path(&mut out, &k, v)?;
    }
    Ok(out)
}

fn collect_equalities(filter: &Document, out: &mut Vec<(String, Bson)>) {
    for (k, v) in filter {
        match (k.as_str(), v) {
            ("$and", Bson::Array(arr)) => {
                for e in arr {
                    if let Bson::Document(d) = e {
                        collect_equalities(d, out);
                    }
                }
                continue;
            }
            // A single-child $or is simplified to its child by the server's optimizer.
            ("$or", Bson::Array(arr)) if arr.len() == 1 => {
                if let Bson::Document(d) = &arr[0] {
                    collect_equalities(d, out);
                }
                continue;
            }
            _ => {}
        }
        if k.starts_with('$') {
            continue;
        }
        let value = match v {
            Bson::RegularExpression(_) => None,
            Bson::Document(d) if d.keys().next().is_some_and(|x| x.starts_with('$')) => {
                let mut found = None;
                for (op, arg) in d {
                    match (op.as_str(), arg) {
                        ("$eq", Bson::RegularExpression(_)) => {}
                        ("$eq", x) => found = Some(x.clone()),
                        ("$in", Bson::Array(a))
                            if a.len() == 1 && !matches!(a[0], Bson::RegularExpression(_)) =>
                        {
                            found = Some(a[0].clone())
                        }
                        _ => {}
                    }
                }
                found
            }
            other => Some(other.clone()),
        };
        if let Some(value) = value {
            out.push((k.clone(), value));
        }
    }
}

/// Builds the document an upsert inserts: the seed from the filter updated by `spec` with
/// `is_upsert_insert` semantics (replacements keep the filter's `_id` equality), `_id` first.
/// If no `_id` results, none is generated here (storage assigns one).
pub fn build_upsert_document(
    filter: &Document,
    spec: &UpdateSpec,
    ctx: &UpdateContext,
) -> CommandResult<Document> {
    let seed = try_upsert_seed(filter)?;
    let mut ctx = ctx.clone();
    ctx.is_upsert_insert = true;
    let doc = match spec {
        UpdateSpec::Replacement(r) => {
            let mut base = Document::new();
            if let Some(id) = seed.get("_id") {
                base.insert("_id", id.clone());
            }
            apply_update(&base, spec, &ctx).map(|mut d| {
                if !r.contains_key("_id") {
                    if let Some(id) = seed.get("_id") {
                        d.insert("_id", id.clone());
                    }
                }
                d
            })?
        }
        _ => apply_update(&seed, spec, &ctx)?,
    };
    Ok(with_id_first(&doc))
}

// ---------------------------------------------------------------------------------------------
// Diffs (v2 oplog delta → updateDescription)
// ---------------------------------------------------------------------------------------------

/// A change stream `updateDescription`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpdateDescription {
    pub updated_fields: Vec<(Vec<PathPart>, Bson)>,
    pub removed_fields: Vec<Vec<PathPart>>,
    pub truncated_arrays: Vec<(Vec<PathPart>, u32)>,
}

impl UpdateDescription {
    /// Drops the spare capacity of the vectors (a description lives as long as its oplog
    /// entry: a one-field `$set` otherwise keeps ~700 bytes of heap, ~300 after).
    pub fn shrink_to_fit(&mut self) {
        self.updated_fields.shrink_to_fit();
        for (path, _) in &mut self.updated_fields {
            path.shrink_to_fit();
        }
        self.removed_fields.shrink_to_fit();
        for path in &mut self.removed_fields {
            path.shrink_to_fit();
        }
        self.truncated_arrays.shrink_to_fit();
        for (path, _) in &mut self.truncated_arrays {
            path.shrink_to_fit();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.updated_fields.is_empty()
            && self.removed_fields.is_empty()
            && self.truncated_arrays.is_empty()
    }

    /// `{updatedFields: {...}, removedFields: [...], truncatedArrays: [...]}` with dotted keys.
    pub fn to_document(&self) -> Document {
        let mut updated = Document::new();
        for (p, v) in &self.updated_fields {
            updated.insert(dotted(p), v.clone());
        }
        let removed: Vec<Bson> = self
            .removed_fields
            .iter()
            .map(|p| Bson::String(dotted(p)))
            .collect();
        let truncated: Vec<Bson> = self
            .truncated_arrays
            .iter()
            .map(|(p, n)| {
                let mut d = Document::new();
                d.insert("field", dotted(p));
                d.insert("newSize", *n as i32);
                Bson::Document(d)
            })
            .collect();
        let mut out = Document::new();
        out.insert("updatedFields", updated);
        out.insert("removedFields", removed);
        out.insert("truncatedArrays", truncated);
        out
    }
}

/// Size of the `$v: 2` oplog entry's metadata the server pads the diff with.
const DELTA_OPLOG_METADATA_SIZE: usize = 15;
const EMPTY_DOC_DIFF_SIZE: usize = 5;
const EMPTY_ARRAY_DIFF_SIZE: usize = 9;

enum DiffNode {
    Doc(DocDiff),
    Arr(ArrDiff),
}

impl DiffNode {
    fn size(&self) -> usize {
        match self {
            DiffNode::Doc(d) => d.size,
            DiffNode::Arr(a) => a.size,
        }
    }
}

struct DocDiff {
    size: usize,
    deletes: Vec<String>,
    updates: Vec<(String, Bson)>,
    inserts: Vec<(String, Bson)>,
    subs: Vec<(String, DiffNode)>,
}

impl DocDiff {
    fn new(padding: usize) -> Self {
        DocDiff {
            size: padding + EMPTY_DOC_DIFF_SIZE,
            deletes: Vec::new(),
            updates: Vec::new(),
            inserts: Vec::new(),
            subs: Vec::new(),
        }
    }
    fn add_update(&mut self, k: &str, v: &Bson) {
        self.size += k.len() + 2 + bson_value_size(v) + if self.updates.is_empty() { 8 } else { 0 };
        self.updates.push((k.to_string(), v.clone()));
    }
    fn add_insert(&mut self, k: &str, v: &Bson) {
        self.size += k.len() + 2 + bson_value_size(v) + if self.inserts.is_empty() { 8 } else { 0 };
        self.inserts.push((k.to_string(), v.clone()));
    }
    fn add_delete(&mut self, k: &str) {
        self.size += k.len() + 2 + 1 + if self.deletes.is_empty() { 8 } else { 0 };
        self.deletes.push(k.to_string());
    }
    fn add_sub(&mut self, k: &str, n: DiffNode) {
        self.size += k.len() + 2 + n.size() + 1;
        self.subs.push((k.to_string(), n));
    }
}

struct ArrDiff {
    size: usize,
    resize: Option<usize>,
    entries: Vec<(usize, ArrEntry)>,
}

enum ArrEntry {
    Update(Bson),
    Sub(DiffNode),
}

impl ArrDiff {
    fn new() -> Self {
        ArrDiff {
            size: EMPTY_ARRAY_DIFF_SIZE,
            resize: None,
            entries: Vec::new(),
        }
    }
    fn add_update(&mut self, i: usize, v: &Bson) {
        self.size += 1 + decimal_digits(i) + 2 + bson_value_size(v);
        self.entries.push((i, ArrEntry::Update(v.clone())));
    }
    fn add_sub(&mut self, i: usize, n: DiffNode) {
        self.size += 1 + decimal_digits(i) + 2 + n.size();
        self.entries.push((i, ArrEntry::Sub(n)));
    }
}

/// Mirrors the server's `computeDocDiff`: returns `None` when the diff would be larger than
/// the post-image (the caller then logs the whole value). `bail` disables that check at this
/// level only (sub-levels always apply it).
fn compute_doc_diff(
    pre: &Document,
    post: &Document,
    bail: bool,
    padding: usize,
) -> Option<DocDiff> {
    let post_size = document_bson_size(post);
    let mut node = DocDiff::new(padding);
    let pre_v: Vec<(&String, &Bson)> = pre.iter().collect();
    let post_v: Vec<(&String, &Bson)> = post.iter().collect();
    let (mut i, mut j) = (0, 0);
    let mut deletes: BTreeSet<&str> = BTreeSet::new();
    while i < pre_v.len() && j < post_v.len() {
        if bail && post_size < node.size {
            return None;
        }
        let (pk, pv) = pre_v[i];
        let (qk, qv) = post_v[j];
        if pk == qk && binary_equal(pv, qv) {
            i += 1;
            j += 1;
            continue;
        }
        if pk == qk {
            match (pv, qv) {
                (Bson::Document(a), Bson::Document(b)) => match compute_doc_diff(a, b, true, 0) {
                    Some(sub) => node.add_sub(pk, DiffNode::Doc(sub)),
                    None => node.add_update(pk, qv),
                },
                (Bson::Array(a), Bson::Array(b)) => match compute_array_diff(a, b) {
                    Some(sub) => node.add_sub(pk, DiffNode::Arr(sub)),
                    None => node.add_update(pk, qv),
                },
                _ => node.add_update(pk, qv),
            }
            i += 1;
            j += 1;
        } else {
            deletes.insert(pk);
            i += 1;
        }
    }
    while i < pre_v.len() {
        node.add_delete(pre_v[i].0);
        i += 1;
    }
    while j < post_v.len() {
        let (qk, qv) = post_v[j];
        node.add_insert(qk, qv);
        deletes.remove(qk.as_str());
        j += 1;
    }
    for d in deletes {
        node.add_delete(d);
    }
    if !bail || post_size > node.size {
        Some(node)
    } else {
        None
    }
}

fn compute_array_diff(pre: &[Bson], post: &[Bson]) -> Option<ArrDiff> {
    let post_size = array_bson_size(post);
    let mut node = ArrDiff::new();
    let mut n = 0;
    while n < pre.len() && n < post.len() {
        if post_size < node.size {
            return None;
        }
        let (pv, qv) = (&pre[n], &post[n]);
        if !binary_equal(pv, qv) {
            match (pv, qv) {
                (Bson::Document(a), Bson::Document(b)) => match compute_doc_diff(a, b, true, 0) {
                    Some(sub) => node.add_sub(n, DiffNode::Doc(sub)),
                    None => node.add_update(n, qv),
                },
                (Bson::Array(a), Bson::Array(b)) => match compute_array_diff(a, b) {
                    Some(sub) => node.add_sub(n, DiffNode::Arr(sub)),
                    None => node.add_update(n, qv),
                },
                _ => node.add_update(n, qv),
            }
        }
        n += 1;
    }
    while n < post.len() {
        node.add_update(n, &post[n]);
        n += 1;
    }
    if pre.len() > post.len() {
        node.resize = Some(post.len());
        node.size += 7;
    }
    if post_size > node.size {
        Some(node)
    } else {
        None
    }
}

fn describe_doc(node: &DocDiff, prefix: &mut Vec<PathPart>, out: &mut UpdateDescription) {
    for k in &node.deletes {
        let mut p = prefix.clone();
        p.push(PathPart::Field(k.clone()));
        out.removed_fields.push(p);
    }
    for (k, v) in node.updates.iter().chain(node.inserts.iter()) {
        let mut p = prefix.clone();
        p.push(PathPart::Field(k.clone()));
        out.updated_fields.push((p, v.clone()));
    }
    for (k, sub) in &node.subs {
        prefix.push(PathPart::Field(k.clone()));
        describe_node(sub, prefix, out);
        prefix.pop();
    }
}

fn describe_node(node: &DiffNode, prefix: &mut Vec<PathPart>, out: &mut UpdateDescription) {
    match node {
        DiffNode::Doc(d) => describe_doc(d, prefix, out),
        DiffNode::Arr(a) => {
            if let Some(n) = a.resize {
                out.truncated_arrays.push((prefix.clone(), n as u32));
            }
            for (i, e) in &a.entries {
                prefix.push(PathPart::Index(*i));
                match e {
                    ArrEntry::Update(v) => out.updated_fields.push((prefix.clone(), v.clone())),
                    ArrEntry::Sub(s) => describe_node(s, prefix, out),
                }
                prefix.pop();
            }
        }
    }
}

/// The `updateDescription` of the change from `old` to `new`, computed like the server's v2
/// oplog delta (`doc_diff::computeOplogDiff`): unchanged fields are skipped (exact BSON
/// equality), changed sub-documents and arrays are described recursively unless their diff
/// would be larger than their new value (then the whole value is reported), arrays that
/// shrink get a `truncatedArrays` entry, removed fields go to `removed_fields`, and a field
/// whose position among the common fields changed is reported with its whole value.
///
/// Unlike [`compute_oplog_diff`] this never gives up at the top level.
pub fn diff_documents(old: &Document, new: &Document) -> UpdateDescription {
    let node = compute_doc_diff(old, new, false, 0).expect("no top-level bail");
    let mut out = UpdateDescription::default();
    describe_doc(&node, &mut Vec::new(), &mut out);
    out
}

/// Like [`diff_documents`] but returns `None` when the server would log the update as a full
/// replacement (diff larger than the new document), which a change stream reports as a
/// `replace` event. This is what pipeline-style updates produce.
pub fn compute_oplog_diff(old: &Document, new: &Document) -> Option<UpdateDescription> {
    let node = compute_doc_diff(old, new, true, DELTA_OPLOG_METADATA_SIZE)?;
    let mut out = UpdateDescription::default();
    describe_doc(&node, &mut Vec::new(), &mut out);
    Some(out)
}

/// Whether two documents are identical (the update was a no-op and no oplog entry exists).
pub fn is_noop(old: &Document, new: &Document) -> bool {
    documents_binary_equal(old, new)
}

// ---------------------------------------------------------------------------------------------
// Update descriptions as the server logs them
// ---------------------------------------------------------------------------------------------

/// How the server records an applied update, which decides the change stream event.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateOutcome {
    /// The document is unchanged: no oplog entry, no change event.
    NoOp,
    /// Logged as a `$v: 2` delta: an `update` event with this description.
    Delta(UpdateDescription),
    /// Logged as a full replacement: a `replace` event.
    Replacement,
}

/// Applies an update and also returns how the server would log it:
/// * replacement-style updates are logged as replacements;
/// * pipeline-style updates are diffed with [`compute_oplog_diff`] (falling back to a
///   replacement when the diff would be larger than the document);
/// * operator updates are logged per modified path, as the server's update tree does:
///   a changed existing path is reported with its whole new value (`{$set: {a: {x: 1}}}`
///   reports `a`, not `a.x`), a newly created path is reported at its first new component
///   (`{$set: {"a.b.c": 1}}` on `{}` reports `a: {b: {c: 1}}`), `$unset` reports removals,
///   `$push`/`$addToSet` appends to a non-empty array report each new element (`arr.3`),
///   other array modifications report the whole array; unchanged paths report nothing.
pub fn apply_update_with_outcome(
    original: &Document,
    spec: &UpdateSpec,
    ctx: &UpdateContext,
) -> CommandResult<(Document, UpdateOutcome)> {
    let resolved = resolve_array_updates(original, spec, ctx)?;
    let spec = resolved.as_ref().unwrap_or(spec);
    let new = apply_resolved(original, spec, ctx)?;
    if documents_binary_equal(original, &new) {
        return Ok((new, UpdateOutcome::NoOp));
    }
    let outcome = match spec {
        UpdateSpec::Replacement(_) => UpdateOutcome::Replacement,
        UpdateSpec::Pipeline(_) => match compute_oplog_diff(original, &new) {
            Some(d) => UpdateOutcome::Delta(d),
            None => UpdateOutcome::Replacement,
        },
        UpdateSpec::Operators(ops) => {
            UpdateOutcome::Delta(describe_operator_update(original, &new, ops, ctx))
        }
    };
    Ok((new, outcome))
}

enum LogEntry {
    Update(Bson),
    Insert(Bson),
    Delete,
}

/// Resolves path components against a document: which are array indexes, and how many
/// components exist.
fn resolve(doc: &Document, parts: &[&str]) -> (Vec<PathPart>, usize) {
    let mut out = Vec::with_capacity(parts.len());
    let mut existing = 0;
    let mut cur: Option<&Bson> = None;
    for (i, p) in parts.iter().enumerate() {
        let (part, next) = if i == 0 {
            (PathPart::Field(p.to_string()), doc.get(*p))
        } else {
            match cur {
                Some(Bson::Document(d)) => (PathPart::Field(p.to_string()), d.get(*p)),
                Some(Bson::Array(a)) => match parse_index(p) {
                    Some(ix) => (PathPart::Index(ix), a.get(ix)),
                    None => (PathPart::Field(p.to_string()), None),
                },
                _ => (PathPart::Field(p.to_string()), None),
            }
        };
        out.push(part);
        if next.is_some() && existing == i {
            existing = i + 1;
        }
        cur = next;
    }
    (out, existing)
}

fn describe_operator_update(
    original: &Document,
    new: &Document,
    ops: &Document,
    ctx: &UpdateContext,
) -> UpdateDescription {
    // Rebuild the applied operations in application order.
    let mut list: Vec<(&str, &str, &Bson)> = Vec::new();
    for (op, fields) in ops {
        if let Bson::Document(fields) = fields {
            for (path, arg) in fields {
                list.push((op.as_str(), path.as_str(), arg));
            }
        }
    }
    let key = |(op, path, arg): &(&str, &str, &Bson)| -> String {
        match (*op, arg) {
            ("$rename", Bson::String(to)) => to.clone(),
            _ => path.to_string(),
        }
    };
    list.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.split('.')
            .map(|s| s.as_bytes())
            .cmp(kb.split('.').map(|s| s.as_bytes()))
    });
    let mut root = DocDiff::new(0);
    let mut created: Vec<Vec<PathPart>> = Vec::new();
    for (op, path, arg) in list {
        if op == "$setOnInsert" && !ctx.is_upsert_insert {
            continue;
        }
        if op == "$rename" {
            let Bson::String(to) = arg else { continue };
            if get_path(original, path).is_none() {
                continue;
            }
            let parts: Vec<&str> = path.split('.').collect();
            let (resolved, _) = resolve(original, &parts);
            add_log_entry(&mut root, &resolved, LogEntry::Delete);
            log_target(&mut root, &mut created, original, new, to, false);
            continue;
        }
        let appendable = match op {
            "$addToSet" => true,
            "$push" => match arg {
                Bson::Document(d) if d.contains_key("$each") => {
                    !d.contains_key("$sort")
                        && !d.contains_key("$slice")
                        && match d.get("$position") {
                            None => true,
                            Some(p) => {
                                let len = match get_path(original, path) {
                                    Some(Bson::Array(a)) => a.len() as i64,
                                    _ => 0,
                                };
                                int_arg(p).is_some_and(|p| p > len)
                            }
                        }
                }
                _ => true,
            },
            _ => false,
        };
        log_target(&mut root, &mut created, original, new, path, appendable);
    }
    let mut out = UpdateDescription::default();
    sort_array_entries_doc(&mut root);
    describe_doc(&root, &mut Vec::new(), &mut out);
    out
}

fn log_target(
    root: &mut DocDiff,
    created: &mut Vec<Vec<PathPart>>,
    original: &Document,
    new: &Document,
    path: &str,
    appendable: bool,
) {
    let parts: Vec<&str> = path.split('.').collect();
    let (resolved, existing) = resolve(original, &parts);
    let old_v = if existing == parts.len() {
        get_path(original, path)
    } else {
        None
    };
    let new_v = get_path(new, path);
    match (old_v, new_v) {
        (Some(o), Some(n)) => {
            if binary_equal(o, n) {
                return;
            }
            if appendable {
                if let (Bson::Array(oa), Bson::Array(na)) = (o, n) {
                    if !oa.is_empty()
                        && na.len() > oa.len()
                        && oa.iter().zip(na.iter()).all(|(x, y)| binary_equal(x, y))
                    {
                        for (i, v) in na.iter().enumerate().skip(oa.len()) {
                            let mut p = resolved.clone();
                            p.push(PathPart::Index(i));
                            add_log_entry(root, &p, LogEntry::Insert(v.clone()));
                        }
                        return;
                    }
                }
            }
            add_log_entry(root, &resolved, LogEntry::Update(n.clone()));
        }
        (Some(_), None) => add_log_entry(root, &resolved, LogEntry::Delete),
        (None, Some(_)) => {
            // Created: logged at the first component that did not exist.
            let prefix_parts = &parts[..existing];
            let container = if existing == 0 {
                None
            } else {
                get_path(original, &prefix_parts.join("."))
            };
            if let Some(Bson::Array(_)) = container {
                // Extending an array (padding with nulls): the whole array is logged.
                let p = resolved[..existing].to_vec();
                if let Some(v) = get_path(new, &prefix_parts.join(".")) {
                    add_log_entry(root, &p, LogEntry::Update(v.clone()));
                }
                return;
            }
            let p = resolved[..existing + 1].to_vec();
            if created.contains(&p) {
                return;
            }
            let created_path = parts[..existing + 1].join(".");
            if let Some(v) = get_path(new, &created_path) {
                add_log_entry(root, &p, LogEntry::Insert(v.clone()));
                created.push(p);
            }
        }
        (None, None) => {}
    }
}

fn part_key(p: &PathPart) -> String {
    p.to_string()
}

fn add_log_entry(node: &mut DocDiff, path: &[PathPart], e: LogEntry) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let k = part_key(first);
    if rest.is_empty() {
        match e {
            LogEntry::Update(v) => node.updates.push((k, v)),
            LogEntry::Insert(v) => node.inserts.push((k, v)),
            LogEntry::Delete => node.deletes.push(k),
        }
        return;
    }
    let want_array = matches!(rest[0], PathPart::Index(_));
    let pos = node.subs.iter().position(|(n, _)| *n == k);
    let idx = match pos {
        Some(i) => i,
        None => {
            let child = if want_array {
                DiffNode::Arr(ArrDiff::new())
            } else {
                DiffNode::Doc(DocDiff::new(0))
            };
            node.subs.push((k, child));
            node.subs.len() - 1
        }
    };
    match &mut node.subs[idx].1 {
        DiffNode::Doc(d) => add_log_entry(d, rest, e),
        DiffNode::Arr(a) => add_log_entry_arr(a, rest, e),
    }
}

fn add_log_entry_arr(node: &mut ArrDiff, path: &[PathPart], e: LogEntry) {
    let Some((PathPart::Index(i), rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match e {
            LogEntry::Update(v) | LogEntry::Insert(v) => {
                node.entries.push((*i, ArrEntry::Update(v)))
            }
            LogEntry::Delete => {}
        }
        return;
    }
    let want_array = matches!(rest[0], PathPart::Index(_));
    let pos = node
        .entries
        .iter()
        .position(|(ix, en)| ix == i && matches!(en, ArrEntry::Sub(_)));
    let idx = match pos {
        Some(p) => p,
        None => {
            let child = if want_array {
                DiffNode::Arr(ArrDiff::new())
            } else {
                DiffNode::Doc(DocDiff::new(0))
            };
            node.entries.push((*i, ArrEntry::Sub(child)));
            node.entries.len() - 1
        }
    };
    if let ArrEntry::Sub(sub) = &mut node.entries[idx].1 {
        match sub {
            DiffNode::Doc(d) => add_log_entry(d, rest, e),
            DiffNode::Arr(a) => add_log_entry_arr(a, rest, e),
        }
    }
}

fn sort_array_entries_doc(node: &mut DocDiff) {
    for (_, sub) in node.subs.iter_mut() {
        sort_array_entries(sub);
    }
}

fn sort_array_entries(node: &mut DiffNode) {
    match node {
        DiffNode::Doc(d) => sort_array_entries_doc(d),
        DiffNode::Arr(a) => {
            a.entries.sort_by_key(|(i, _)| *i);
            for (_, e) in a.entries.iter_mut() {
                if let ArrEntry::Sub(s) = e {
                    sort_array_entries(s);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering helpers
// ---------------------------------------------------------------------------------------------

fn type_name_long(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Boolean(_) => "bool",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        Bson::Null => "null",
        other => type_name(other),
    }
}

/// Renders a value roughly the way the server's `BSONElement::toString` does in messages.
pub fn server_repr(b: &Bson) -> String {
    match b {
        Bson::String(s) => format!("\"{s}\""),
        Bson::Double(d) => {
            if d.fract() == 0.0 && d.is_finite() && d.abs() < 1e15 {
                format!("{d:.1}")
            } else {
                format!("{d}")
            }
        }
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Null => "null".into(),
        Bson::Boolean(x) => x.to_string(),
        Bson::ObjectId(o) => format!("ObjectId('{}')", o.to_hex()),
        Bson::Document(d) => {
            if d.is_empty() {
                return "{}".into();
            }
            let inner: Vec<String> = d
                .iter()
                .map(|(k, v)| format!("{k}: {}", server_repr(v)))
                .collect();
            format!("{{ {} }}", inner.join(", "))
        }
        Bson::Array(a) => {
            if a.is_empty() {
                return "[]".into();
            }
            let inner: Vec<String> = a.iter().map(server_repr).collect();
            format!("[ {} ]", inner.join(", "))
        }
        other => other.to_string(),
    }
}

/// The array index a path component denotes, if any (re-exported for callers).
pub fn path_index(component: &str) -> Option<usize> {
    parse_index(component)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Timestamp};

    fn ctx() -> UpdateContext {
        UpdateContext::new(
            bson::DateTime::from_millis(1_000),
            Timestamp {
                time: 7,
                increment: 3,
            },
        )
    }

    fn upd(d: Document, u: Document) -> CommandResult<Document> {
        let spec = UpdateSpec::parse(&Bson::Document(u))?;
        apply_update(&d, &spec, &ctx())
    }

    fn ok(d: Document, u: Document) -> Document {
        upd(d, u).unwrap()
    }

    fn code(d: Document, u: Document) -> i32 {
        upd(d, u).unwrap_err().code
    }

    fn keys(d: &Document) -> Vec<String> {
        d.keys().cloned().collect()
    }

    fn f(s: &str) -> PathPart {
        PathPart::Field(s.into())
    }

    #[test]
    fn parse_classifies() {
        assert!(matches!(
            UpdateSpec::parse(&Bson::Document(doc! {"$set": {"a": 1}})).unwrap(),
            UpdateSpec::Operators(_)
        ));
        assert!(matches!(
            UpdateSpec::parse(&Bson::Document(doc! {"a": 1})).unwrap(),
            UpdateSpec::Replacement(_)
        ));
        assert!(matches!(
            UpdateSpec::parse(&bson::bson!([{"$set": {"a": 1}}])).unwrap(),
            UpdateSpec::Pipeline(_)
        ));
        let e = UpdateSpec::parse(&Bson::Document(doc! {"$set": {"a": 1}, "b": 2})).unwrap_err();
        assert_eq!(e.code, 9);
        assert!(e.message.starts_with("Unknown modifier: b."));
        let e = UpdateSpec::parse(&Bson::Document(doc! {"$foo": {"a": 1}})).unwrap_err();
        assert_eq!(e.code, 9);
        assert_eq!(
            e.message,
            "Unknown modifier: $foo. Expected a valid update modifier or pipeline-style update specified as an array"
        );
        assert_eq!(
            UpdateSpec::parse(&Bson::Document(doc! {"$set": 1}))
                .unwrap_err()
                .code,
            9
        );
        assert_eq!(UpdateSpec::parse(&bson::bson!([1])).unwrap_err().code, 9);
    }

    #[test]
    fn set_keeps_position_and_appends_sorted() {
        let r = ok(
            doc! {"_id": 1, "a": 1, "b": 2},
            doc! {"$set": {"z": 1, "a": 5, "m": {"x": 1}}},
        );
        assert_eq!(r, doc! {"_id": 1, "a": 5, "b": 2, "m": {"x": 1}, "z": 1});
        assert_eq!(keys(&r), vec!["_id", "a", "b", "m", "z"]);
        let r = ok(doc! {"_id": 1}, doc! {"$set": {"x.b": 1, "x.a": 2}});
        assert_eq!(keys(r.get_document("x").unwrap()), vec!["a", "b"]);
        assert_eq!(ok(doc! {"_id": 1}, doc! {"$set": {}}), doc! {"_id": 1});
        let r = ok(doc! {"_id": 1, "a": [1, 2]}, doc! {"$set": {"a.3": 9}});
        assert_eq!(r, doc! {"_id": 1, "a": [1, 2, null, 9]});
        assert_eq!(code(doc! {"_id": 1, "a": 1}, doc! {"$set": {"a.b": 1}}), 28);
        assert_eq!(code(doc! {"_id": 1}, doc! {"$set": {"": 1}}), 56);
        assert_eq!(code(doc! {"_id": 1}, doc! {"$set": {"a..b": 1}}), 56);
        assert_eq!(code(doc! {"_id": 1}, doc! {"$set": {"$x": 1}}), 52);
    }

    #[test]
    fn unset_and_id_rules() {
        assert_eq!(
            ok(doc! {"_id": 1, "a": 1, "b": 2}, doc! {"$unset": {"a": ""}}),
            doc! {"_id": 1, "b": 2}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$unset": {"nope": 1, "x.y": 1}}),
            doc! {"_id": 1}
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": [1, 2]}, doc! {"$unset": {"a.0": 1}}),
            doc! {"_id": 1, "a": [null, 2]}
        );
        let e = upd(doc! {"_id": 1}, doc! {"$set": {"_id": 2}}).unwrap_err();
        assert_eq!(e.code, 66);
        assert_eq!(
            e.message,
            "Performing an update on the path '_id' would modify the immutable field '_id'"
        );
        assert_eq!(code(doc! {"_id": 1}, doc! {"$unset": {"_id": 1}}), 66);
        assert_eq!(
            code(doc! {"_id": {"a": 1}}, doc! {"$set": {"_id.a": 2}}),
            66
        );
        // Setting _id to an equal value is allowed.
        assert_eq!(
            ok(doc! {"_id": 1, "a": 1}, doc! {"$set": {"_id": 1, "a": 2}}),
            doc! {"_id": 1, "a": 2}
        );
    }

    #[test]
    fn conflicts() {
        let e = upd(doc! {"_id": 1}, doc! {"$set": {"a": 1}, "$inc": {"a": 1}}).unwrap_err();
        assert_eq!(e.code, 40);
        assert_eq!(
            e.message,
            "Updating the path 'a' would create a conflict at 'a'"
        );
        let e = upd(doc! {"_id": 1}, doc! {"$set": {"a": 1, "a.b": 1}}).unwrap_err();
        assert_eq!(
            e.message,
            "Updating the path 'a.b' would create a conflict at 'a'"
        );
        let e = upd(
            doc! {"_id": 1},
            doc! {"$set": {"a.b": 1}, "$unset": {"a": 1}},
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "Updating the path 'a' would create a conflict at 'a'"
        );
        assert!(upd(doc! {"_id": 1}, doc! {"$set": {"a.b": 1, "a.c": 1}}).is_ok());
        assert!(upd(doc! {"_id": 1}, doc! {"$set": {"ab": 1, "a": 1}}).is_ok());
        assert_eq!(
            code(
                doc! {"_id": 1, "a": 1},
                doc! {"$rename": {"a": "b"}, "$set": {"b": 1}}
            ),
            40
        );
    }

    #[test]
    fn inc_and_mul() {
        assert_eq!(
            ok(doc! {"_id": 1, "a": 1}, doc! {"$inc": {"a": 2}}),
            doc! {"_id": 1, "a": 3}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$inc": {"a": 2i64}}),
            doc! {"_id": 1, "a": 2i64}
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": 1}, doc! {"$inc": {"a": 0.5}}),
            doc! {"_id": 1, "a": 1.5}
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": i32::MAX}, doc! {"$inc": {"a": 1}}),
            doc! {"_id": 1, "a": i32::MAX as i64 + 1}
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": 1i64}, doc! {"$inc": {"a": 1}}),
            doc! {"_id": 1, "a": 2i64}
        );
        let e = upd(doc! {"_id": 1, "a": "x"}, doc! {"$inc": {"a": 1}}).unwrap_err();
        assert_eq!(e.code, 14);
        assert_eq!(
            e.message,
            "Cannot apply $inc to a value of non-numeric type. {_id: 1} has the field 'a' of non-numeric type string"
        );
        let e = upd(doc! {"_id": 1}, doc! {"$inc": {"a": "x"}}).unwrap_err();
        assert_eq!(e.code, 14);
        assert_eq!(
            e.message,
            "Cannot increment with non-numeric argument: {a: \"x\"}"
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": 3}, doc! {"$mul": {"a": 2}}),
            doc! {"_id": 1, "a": 6}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$mul": {"a": 2.5}}),
            doc! {"_id": 1, "a": 0.0}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$mul": {"a": 2i64}}),
            doc! {"_id": 1, "a": 0i64}
        );
        assert_eq!(
            code(doc! {"_id": 1, "a": null}, doc! {"$mul": {"a": 2}}),
            14
        );
    }

    #[test]
    fn min_max_current_date() {
        assert_eq!(
            ok(doc! {"_id": 1, "a": 5}, doc! {"$min": {"a": 3}}),
            doc! {"_id": 1, "a": 3}
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": 5}, doc! {"$min": {"a": 7}}),
            doc! {"_id": 1, "a": 5}
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": 5}, doc! {"$max": {"a": 7}}),
            doc! {"_id": 1, "a": 7}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$max": {"a": 7}}),
            doc! {"_id": 1, "a": 7}
        );
        // Cross-type: null < numbers < strings.
        assert_eq!(
            ok(doc! {"_id": 1, "a": 5}, doc! {"$max": {"a": "s"}}),
            doc! {"_id": 1, "a": "s"}
        );
        assert_eq!(
            ok(doc! {"_id": 1, "a": 5}, doc! {"$min": {"a": null}}),
            doc! {"_id": 1, "a": null}
        );
        let r = ok(
            doc! {"_id": 1},
            doc! {"$currentDate": {"d": true, "t": {"$type": "timestamp"}, "e": {"$type": "date"}}},
        );
        assert_eq!(
            r,
            doc! {"_id": 1, "d": bson::DateTime::from_millis(1000), "e": bson::DateTime::from_millis(1000), "t": Timestamp {time: 7, increment: 3}}
        );
        assert_eq!(
            code(
                doc! {"_id": 1},
                doc! {"$currentDate": {"d": {"$type": "x"}}}
            ),
            2
        );
        assert_eq!(code(doc! {"_id": 1}, doc! {"$currentDate": {"d": 1}}), 2);
    }

    #[test]
    fn rename() {
        let r = ok(
            doc! {"_id": 1, "a": 1, "b": 2},
            doc! {"$rename": {"a": "c"}},
        );
        assert_eq!(r, doc! {"_id": 1, "b": 2, "c": 1});
        assert_eq!(keys(&r), vec!["_id", "b", "c"]);
        let r = ok(
            doc! {"_id": 1, "a": 1, "b": 2},
            doc! {"$rename": {"b": "a"}},
        );
        assert_eq!(r, doc! {"_id": 1, "a": 2});
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$rename": {"a": "c"}}),
            doc! {"_id": 1}
        );
        assert_eq!(
            ok(
                doc! {"_id": 1, "a": {"b": 1}},
                doc! {"$rename": {"a.b": "x.y"}}
            ),
            doc! {"_id": 1, "a": {}, "x": {"y": 1}}
        );
        assert_eq!(
            code(doc! {"_id": 1, "a": 1}, doc! {"$rename": {"a": "a"}}),
            2
        );
        assert_eq!(
            code(doc! {"_id": 1, "a": 1}, doc! {"$rename": {"a": "a.b"}}),
            2
        );
        assert_eq!(code(doc! {"_id": 1, "a": 1}, doc! {"$rename": {"a": 1}}), 2);
        assert_eq!(
            code(
                doc! {"_id": 1, "a": [{"b": 1}]},
                doc! {"$rename": {"a.0.b": "c"}}
            ),
            2
        );
        assert_eq!(
            code(doc! {"_id": 1, "a": 2}, doc! {"$rename": {"a": "_id"}}),
            66
        );
    }

    #[test]
    fn set_on_insert() {
        let spec = UpdateSpec::parse(&Bson::Document(
            doc! {"$setOnInsert": {"c": 1}, "$set": {"a": 1}},
        ))
        .unwrap();
        let mut c = ctx();
        assert_eq!(
            apply_update(&doc! {"_id": 1}, &spec, &c).unwrap(),
            doc! {"_id": 1, "a": 1}
        );
        c.is_upsert_insert = true;
        assert_eq!(
            apply_update(&doc! {"_id": 1}, &spec, &c).unwrap(),
            doc! {"_id": 1, "a": 1, "c": 1}
        );
    }

    #[test]
    fn push_variants() {
        let d = doc! {"_id": 1, "a": [3, 1]};
        assert_eq!(
            ok(d.clone(), doc! {"$push": {"a": 2}}),
            doc! {"_id": 1, "a": [3, 1, 2]}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$push": {"a": 2}}),
            doc! {"_id": 1, "a": [2]}
        );
        assert_eq!(
            ok(d.clone(), doc! {"$push": {"a": [4]}}),
            doc! {"_id": 1, "a": [3, 1, [4]]}
        );
        assert_eq!(
            ok(d.clone(), doc! {"$push": {"a": {"$each": [5, 6]}}}),
            doc! {"_id": 1, "a": [3, 1, 5, 6]}
        );
        assert_eq!(
            ok(
                d.clone(),
                doc! {"$push": {"a": {"$each": [5, 6], "$position": 1}}}
            ),
            doc! {"_id": 1, "a": [3, 5, 6, 1]}
        );
        assert_eq!(
            ok(
                d.clone(),
                doc! {"$push": {"a": {"$each": [5], "$position": -1}}}
            ),
            doc! {"_id": 1, "a": [3, 5, 1]}
        );
        assert_eq!(
            ok(
                d.clone(),
                doc! {"$push": {"a": {"$each": [5, 0], "$sort": 1}}}
            ),
            doc! {"_id": 1, "a": [0, 1, 3, 5]}
        );
        assert_eq!(
            ok(
                d.clone(),
                doc! {"$push": {"a": {"$each": [5, 0], "$sort": -1, "$slice": 2}}}
            ),
            doc! {"_id": 1, "a": [5, 3]}
        );
        assert_eq!(
            ok(
                d.clone(),
                doc! {"$push": {"a": {"$each": [5, 0], "$slice": -2}}}
            ),
            doc! {"_id": 1, "a": [5, 0]}
        );
        assert_eq!(
            ok(
                d.clone(),
                doc! {"$push": {"a": {"$each": [5], "$slice": 0}}}
            ),
            doc! {"_id": 1, "a": []}
        );
        let docs = doc! {"_id": 1, "s": [{"n": 2}, {"n": 1}]};
        assert_eq!(
            ok(
                docs,
                doc! {"$push": {"s": {"$each": [{"n": 0}], "$sort": {"n": 1}}}}
            ),
            doc! {"_id": 1, "s": [{"n": 0}, {"n": 1}, {"n": 2}]}
        );
        // A document without $each is pushed as is.
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$push": {"a": {"x": 1}}}),
            doc! {"_id": 1, "a": [{"x": 1}]}
        );
        let e = upd(doc! {"_id": 1, "a": 1}, doc! {"$push": {"a": 2}}).unwrap_err();
        assert_eq!(e.code, 2);
        assert_eq!(
            e.message,
            "The field 'a' must be an array but is of type int in document {_id: 1}"
        );
        assert_eq!(code(d.clone(), doc! {"$push": {"a": {"$each": 1}}}), 2);
        assert_eq!(
            code(
                d.clone(),
                doc! {"$push": {"a": {"$each": [1], "$slice": "x"}}}
            ),
            2
        );
        assert_eq!(
            code(d, doc! {"$push": {"a": {"$each": [1], "$bogus": 1}}}),
            2
        );
    }

    #[test]
    fn add_to_set_pop_pull() {
        let d = doc! {"_id": 1, "a": [1, 2, 3, 2]};
        assert_eq!(ok(d.clone(), doc! {"$addToSet": {"a": 2.0}}), d.clone());
        assert_eq!(
            ok(d.clone(), doc! {"$addToSet": {"a": 4}}),
            doc! {"_id": 1, "a": [1, 2, 3, 2, 4]}
        );
        assert_eq!(
            ok(
                d.clone(),
                doc! {"$addToSet": {"a": {"$each": [4, 4, 1, 5]}}}
            ),
            doc! {"_id": 1, "a": [1, 2, 3, 2, 4, 5]}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$addToSet": {"a": 1}}),
            doc! {"_id": 1, "a": [1]}
        );
        assert_eq!(
            code(doc! {"_id": 1, "a": 1}, doc! {"$addToSet": {"a": 1}}),
            2
        );
        assert_eq!(
            ok(d.clone(), doc! {"$pop": {"a": 1}}),
            doc! {"_id": 1, "a": [1, 2, 3]}
        );
        assert_eq!(
            ok(d.clone(), doc! {"$pop": {"a": -1}}),
            doc! {"_id": 1, "a": [2, 3, 2]}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$pop": {"a": 1}}),
            doc! {"_id": 1}
        );
        assert_eq!(code(d.clone(), doc! {"$pop": {"a": 2}}), 9);
        assert_eq!(code(doc! {"_id": 1, "a": 1}, doc! {"$pop": {"a": 1}}), 14);
        assert_eq!(
            ok(d.clone(), doc! {"$pull": {"a": 2}}),
            doc! {"_id": 1, "a": [1, 3]}
        );
        assert_eq!(
            ok(d.clone(), doc! {"$pull": {"a": {"$gte": 2}}}),
            doc! {"_id": 1, "a": [1]}
        );
        assert_eq!(
            ok(d.clone(), doc! {"$pull": {"a": {"$in": [1, 3]}}}),
            doc! {"_id": 1, "a": [2, 2]}
        );
        assert_eq!(
            ok(d.clone(), doc! {"$pullAll": {"a": [2, 3]}}),
            doc! {"_id": 1, "a": [1]}
        );
        let objs = doc! {"_id": 1, "a": [{"x": 1, "y": 1}, {"x": 2}, 5]};
        assert_eq!(
            ok(objs.clone(), doc! {"$pull": {"a": {"x": 1}}}),
            doc! {"_id": 1, "a": [{"x": 2}, 5]}
        );
        assert_eq!(
            ok(objs, doc! {"$pull": {"a": {"x": {"$gt": 0}}}}),
            doc! {"_id": 1, "a": [5]}
        );
        assert_eq!(
            ok(doc! {"_id": 1}, doc! {"$pull": {"a": 1}}),
            doc! {"_id": 1}
        );
        assert_eq!(code(doc! {"_id": 1, "a": 1}, doc! {"$pull": {"a": 1}}), 2);
        assert_eq!(code(d, doc! {"$pullAll": {"a": 1}}), 2);
    }

    #[test]
    fn bit() {
        assert_eq!(
            ok(
                doc! {"_id": 1, "a": 0b1100},
                doc! {"$bit": {"a": {"and": 0b1010}}}
            ),
            doc! {"_id": 1, "a": 0b1000}
        );
        assert_eq!(
            ok(
                doc! {"_id": 1, "a": 0b1100},
                doc! {"$bit": {"a": {"or": 1i64}}}
            ),
            doc! {"_id": 1, "a": 0b1101i64}
        );
    }

    #[test]
    fn replacement() {
        let d = doc! {"_id": 1, "a": 1};
        let r = ok(d.clone(), doc! {"b": 2});
        assert_eq!(r, doc! {"_id": 1, "b": 2});
        // With an equal _id, the replacement's field order is kept.
        let r = ok(d.clone(), doc! {"b": 2, "_id": 1});
        assert_eq!(keys(&r), vec!["b", "_id"]);
        let e = upd(d.clone(), doc! {"_id": 2, "b": 2}).unwrap_err();
        assert_eq!(e.code, 66);
        assert_eq!(
            e.message,
            "After applying the update, the (immutable) field '_id' was found to have been altered to _id: 2"
        );
        assert_eq!(ok(d.clone(), doc! {}), doc! {"_id": 1});
        assert_eq!(code(d.clone(), doc! {"b": 1, "$x": 1}), 52);
        assert_eq!(code(d.clone(), doc! {"_id": [1]}), 53);
        // Zero timestamps at the top level get the current cluster time.
        let r = ok(d, doc! {"t": Timestamp {time: 0, increment: 0}});
        assert_eq!(
            r.get("t"),
            Some(&Bson::Timestamp(Timestamp {
                time: 7,
                increment: 3
            }))
        );
    }

    fn pipe(d: Document, stages: Bson) -> CommandResult<Document> {
        let spec = UpdateSpec::parse(&stages)?;
        apply_update(&d, &spec, &ctx())
    }

    #[test]
    fn pipeline_updates() {
        let d = doc! {"_id": 1, "a": 1, "b": 2};
        let r = pipe(
            d.clone(),
            bson::bson!([{"$set": {"a": {"$add": ["$a", 10]}, "c": "$b"}}]),
        )
        .unwrap();
        assert_eq!(r, doc! {"_id": 1, "a": 11, "b": 2, "c": 2});
        assert_eq!(keys(&r), vec!["_id", "a", "b", "c"]);
        let r = pipe(d.clone(), bson::bson!([{"$unset": ["b"]}])).unwrap();
        assert_eq!(r, doc! {"_id": 1, "a": 1});
        // $replaceWith without _id: the original _id is kept, first.
        let r = pipe(d.clone(), bson::bson!([{"$replaceWith": {"z": "$a"}}])).unwrap();
        assert_eq!(r, doc! {"_id": 1, "z": 1});
        // With _id: exactly the produced document, order as given.
        let r = pipe(
            d.clone(),
            bson::bson!([{"$replaceWith": {"z": "$a", "_id": "$_id"}}]),
        )
        .unwrap();
        assert_eq!(keys(&r), vec!["z", "_id"]);
        assert_eq!(
            pipe(d.clone(), bson::bson!([{"$replaceWith": {"_id": 5}}]))
                .unwrap_err()
                .code,
            66
        );
        // $project without _id exclusion keeps _id.
        let r = pipe(d.clone(), bson::bson!([{"$project": {"b": 1}}])).unwrap();
        assert_eq!(r, doc! {"_id": 1, "b": 2});
        let r = pipe(d.clone(), bson::bson!([{"$project": {"_id": 0, "b": 1}}])).unwrap();
        assert_eq!(r, doc! {"_id": 1, "b": 2});
        // Literal dotted and dollar field names through $setField.
        let r = pipe(
            d.clone(),
            bson::bson!([{"$replaceWith": {"$setField": {"field": "x.y", "input": "$$ROOT", "value": 5}}},
                         {"$replaceWith": {"$setField": {"field": {"$literal": "$d"}, "input": "$$ROOT", "value": 6}}}]),
        )
        .unwrap();
        assert_eq!(r, doc! {"_id": 1, "a": 1, "b": 2, "x.y": 5, "$d": 6});
        assert_eq!(
            pipe(d.clone(), bson::bson!([{"$set": {"n": "$$NOW"}}]))
                .unwrap()
                .get("n"),
            Some(&Bson::DateTime(bson::DateTime::from_millis(1000)))
        );
        assert_eq!(pipe(d, bson::bson!([{"$match": {}}])).unwrap_err().code, 72);
    }

    #[test]
    fn upsert_seeds() {
        assert_eq!(
            upsert_seed(&doc! {"a": 1, "b.c": 2, "d": {"$gt": 1}, "e": {"$eq": 3}}),
            doc! {"a": 1, "b": {"c": 2}, "e": 3}
        );
        assert_eq!(
            upsert_seed(
                &doc! {"$and": [{"a": 1}, {"b": {"$in": [1, 2]}}, {"c": 3}], "$or": [{"x": 1}, {"y": 1}]}
            ),
            doc! {"a": 1, "c": 3}
        );
        assert_eq!(
            upsert_seed(
                &doc! {"_id": 7, "s": bson::Regex { pattern: "x".to_string().try_into().unwrap(), options: "".to_string().try_into().unwrap() }}
            ),
            doc! {"_id": 7}
        );
        assert_eq!(upsert_seed(&doc! {"a": {"b": 1}}), doc! {"a": {"b": 1}});
        assert_eq!(
            upsert_seed(&doc! {"a": {"$in": [4]}, "b": {"$in": [1, 2]}, "$or": [{"c": 1}]}),
            doc! {"a": 4, "c": 1}
        );
        assert_eq!(upsert_seed(&doc! {"$or": [{"c": 1}, {"d": 1}]}), doc! {});
        let e = try_upsert_seed(&doc! {"a": 1, "$and": [{"a": 2}]}).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                54,
                "cannot infer query fields to set, path 'a' is matched twice"
            )
        );
        let e = try_upsert_seed(&doc! {"a": {"x": 1}, "a.b": 2}).unwrap_err();
        assert_eq!(
            e.message,
            "cannot infer query fields to set, both paths 'a.b' and 'a' are matched"
        );
        assert_eq!(
            upsert_seed(&doc! {"a": {"x": 1}, "a.b": 2}),
            doc! {"a": {"x": 1}}
        );
        let spec = UpdateSpec::parse(&Bson::Document(
            doc! {"$set": {"z": 1}, "$setOnInsert": {"i": true}},
        ))
        .unwrap();
        let r = build_upsert_document(&doc! {"k": "v", "_id": 3}, &spec, &ctx()).unwrap();
        assert_eq!(r, doc! {"_id": 3, "k": "v", "i": true, "z": 1});
        let spec = UpdateSpec::parse(&Bson::Document(doc! {"r": 1})).unwrap();
        let r = build_upsert_document(&doc! {"_id": 3, "k": "v"}, &spec, &ctx()).unwrap();
        assert_eq!(r, doc! {"_id": 3, "r": 1});
    }

    #[test]
    fn storage_validation() {
        assert!(validate_stored_document(&doc! {"_id": 1, "a": {"$b": 1}}).is_ok());
        let e = validate_stored_document(&doc! {"_id": [1]}).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (2, "can't use an array for _id")
        );
        assert_eq!(
            validate_stored_document(&doc! {"_id": Bson::Undefined})
                .unwrap_err()
                .message,
            "can't use a undefined for _id"
        );
        // 5.0+: top-level `$`-prefixed and dotted names are legal in inserts, reserved
        // DBRef names too (jstests/core/field_name_validation.js).
        for d in [
            doc! {"_id": 1, "$foo": 1},
            doc! {"$ref": 1},
            doc! {"$id": 1, "$db": 1},
            doc! {"a.b": 1, "_id.a": 1},
            doc! {"_id": {"a.b": 1}},
        ] {
            assert!(validate_stored_document(&d).is_ok(), "{d}");
        }
        assert_eq!(
            validate_stored_document(&doc! {"_id": {"a": 1, "$b": 1}})
                .unwrap_err()
                .code,
            52
        );
        assert_eq!(
            validate_stored_document(&doc! {"_id": {"a": {"$b": 1}}})
                .unwrap_err()
                .code,
            52
        );
        let ts = |t| Timestamp {
            time: t,
            increment: t,
        };
        let d = prepare_for_insert(&doc! {"a": 1, "t": ts(0), "_id": 5}, ts(9)).unwrap();
        assert_eq!(keys(&d), vec!["_id", "a", "t"]);
        assert_eq!(d.get("t"), Some(&Bson::Timestamp(ts(9))));
        let d = prepare_for_insert(&doc! {"a": 1}, ts(9)).unwrap();
        assert!(matches!(d.get("_id"), Some(Bson::ObjectId(_))));
        assert_eq!(keys(&d), vec!["_id", "a"]);
        assert!(validate_updated_document(&doc! {"$foo": 1}, true).is_ok());
        assert_eq!(
            validate_updated_document(&doc! {"$foo": 1}, false)
                .unwrap_err()
                .code,
            52
        );
        assert_eq!(
            validate_updated_document(&doc! {"_id": [1]}, false)
                .unwrap_err()
                .code,
            53
        );
        let e = validate_updated_document(&doc! {"_id": 1, "$foo": 1}, false).unwrap_err();
        assert_eq!(e.message, "The dollar ($) prefixed field '$foo' in '$foo' is not allowed in the context of an update's replacement document. Consider using an aggregation pipeline with $replaceWith.");
        // A DBRef at the top level of a replacement passes (`validateDollarPrefixElement`);
        // misplaced DBRef fields are InvalidDBRef 55.
        assert!(validate_updated_document(
            &doc! {"_id": 1, "$ref": "c", "$id": 1, "$db": "d"},
            false
        )
        .is_ok());
        for (d, msg) in [
            (
                doc! {"_id": 1, "$ref": 1, "$id": 1},
                "The DBRef $ref field must be a String, not a int",
            ),
            (
                doc! {"_id": 1, "$ref": "c"},
                "The DBRef $ref field must be followed by a $id field",
            ),
            (
                doc! {"_id": 1, "$id": 1},
                "Found $id field without a $ref before it, which is invalid.",
            ),
            (
                doc! {"_id": 1, "$db": "d"},
                "Found $db field without a $id before it, which is invalid.",
            ),
            (
                doc! {"_id": 1, "$ref": "c", "$id": 1, "$db": 2},
                "The DBRef $db field must be a String, not a int",
            ),
        ] {
            let e = validate_updated_document(&d, false).unwrap_err();
            assert_eq!((e.code, e.message.as_str()), (55, msg), "{d}");
        }
    }

    #[test]
    fn operator_updates_check_only_the_dollar_fields_they_touch() {
        let stored = doc! {"_id": 1, "$bin": 200, "q": 1, "address": {"$street": "Elm"}};
        let run = |u: Document, upsert: bool| {
            let mut c = ctx();
            c.is_upsert_insert = upsert;
            apply_update(&stored, &UpdateSpec::parse(&Bson::Document(u)).unwrap(), &c)
        };
        // Fields already stored with `$` names do not block updates of other fields, nor do
        // nested `$` paths.
        let d = run(doc! {"$inc": {"q": 1}}, false).unwrap();
        assert_eq!(
            d,
            doc! {"_id": 1, "$bin": 200, "q": 2, "address": {"$street": "Elm"}}
        );
        let d = run(
            doc! {"$set": {"address.$street": "Oak", "n": {"$x": 1}}},
            false,
        )
        .unwrap();
        assert_eq!(d.get_document("address").unwrap(), &doc! {"$street": "Oak"});
        // Creating or changing a top-level `$` field with an operator → 52 ...
        for u in [
            doc! {"$set": {"$hotel": 1}},
            doc! {"$inc": {"$bin": 1}},
            doc! {"$rename": {"q": "$q"}},
            doc! {"$set": {"$new.x": 1}},
        ] {
            assert_eq!(run(u.clone(), false).unwrap_err().code, 52, "{u}");
        }
        // ... but not when the value stays the same, nor in the document an upsert inserts.
        assert!(run(doc! {"$set": {"$bin": 200}}, false).is_ok());
        assert!(run(doc! {"$set": {"$hotel": 1}}, true).is_ok());
    }

    #[test]
    fn diff_nested_and_removed() {
        let old = doc! {"_id": 1, "a": {"b": 1, "c": "a long enough string value", "d": 3}, "x": 1, "gone": 1};
        let new = doc! {"_id": 1, "a": {"b": 2, "c": "a long enough string value", "d": 3}, "x": 1.0, "n": 5};
        let d = diff_documents(&old, &new);
        assert_eq!(d.removed_fields, vec![vec![f("gone")]]);
        assert_eq!(
            d.updated_fields,
            vec![
                (vec![f("x")], Bson::Double(1.0)),
                (vec![f("n")], Bson::Int32(5)),
                (vec![f("a"), f("b")], Bson::Int32(2)),
            ]
        );
        assert!(d.truncated_arrays.is_empty());
        assert!(diff_documents(&old, &old).is_empty());
    }

    #[test]
    fn diff_small_subdocument_is_reported_whole() {
        // The server logs the whole value when the sub-diff is not smaller than the value.
        let old = doc! {"_id": 1, "a": {"b": 1, "c": 1}};
        let new = doc! {"_id": 1, "a": {"b": 2, "c": 1}};
        let d = diff_documents(&old, &new);
        assert_eq!(
            d.updated_fields,
            vec![(vec![f("a")], Bson::Document(doc! {"b": 2, "c": 1}))]
        );
    }

    #[test]
    fn diff_arrays() {
        let long = "x".repeat(40);
        let old = doc! {"_id": 1, "arr": [long.clone(), long.clone(), long.clone(), long.clone()]};
        let new = doc! {"_id": 1, "arr": [long.clone(), "y", long.clone()]};
        let d = diff_documents(&old, &new);
        assert_eq!(d.truncated_arrays, vec![(vec![f("arr")], 3)]);
        assert_eq!(
            d.updated_fields,
            vec![(vec![f("arr"), PathPart::Index(1)], Bson::String("y".into()))]
        );
        // Appends are reported per index.
        let new =
            doc! {"_id": 1, "arr": [long.clone(), long.clone(), long.clone(), long.clone(), 7]};
        let d = diff_documents(&old, &new);
        assert_eq!(
            d.updated_fields,
            vec![(vec![f("arr"), PathPart::Index(4)], Bson::Int32(7))]
        );
        assert!(d.truncated_arrays.is_empty());
        // Documents inside arrays are diffed recursively.
        let old =
            doc! {"_id": 1, "arr": [{"k": long.clone(), "v": 1}, {"k": long.clone(), "v": 2}]};
        let new =
            doc! {"_id": 1, "arr": [{"k": long.clone(), "v": 1}, {"k": long.clone(), "v": 3}]};
        let d = diff_documents(&old, &new);
        assert_eq!(
            d.updated_fields,
            vec![(vec![f("arr"), PathPart::Index(1), f("v")], Bson::Int32(3))]
        );
        assert_eq!(
            update_description_doc(&d),
            doc! {"updatedFields": {"arr.1.v": 3}, "removedFields": [], "truncatedArrays": []}
        );
    }

    fn update_description_doc(d: &UpdateDescription) -> Document {
        d.to_document()
    }

    #[test]
    fn diff_moved_field() {
        let old = doc! {"_id": 1, "a": 1, "b": 2, "c": 3};
        let new = doc! {"_id": 1, "b": 2, "c": 3, "a": 1};
        let d = diff_documents(&old, &new);
        // 'a' no longer matches at its position: b and c line up again after it is skipped,
        // and a is re-inserted at the end → reported as updated with its whole value.
        assert_eq!(d.updated_fields, vec![(vec![f("a")], Bson::Int32(1))]);
        assert!(d.removed_fields.is_empty());
        let new = doc! {"_id": 1, "c": 3, "b": 2, "a": 1};
        let d = diff_documents(&old, &new);
        assert_eq!(
            d.updated_fields,
            vec![
                (vec![f("b")], Bson::Int32(2)),
                (vec![f("a")], Bson::Int32(1))
            ]
        );
    }

    #[test]
    fn oplog_diff_falls_back_to_replacement() {
        let old = doc! {"_id": 1, "a": 1};
        let new = doc! {"_id": 1, "b": 2};
        assert!(compute_oplog_diff(&old, &new).is_none());
        let long = "x".repeat(100);
        let old = doc! {"_id": 1, "a": 1, "s": long.clone()};
        let new = doc! {"_id": 1, "a": 2, "s": long};
        let d = compute_oplog_diff(&old, &new).unwrap();
        assert_eq!(d.updated_fields, vec![(vec![f("a")], Bson::Int32(2))]);
        assert_eq!(dotted(&[f("a"), PathPart::Index(2), f("b")]), "a.2.b");
    }

    fn outcome(d: Document, u: Bson) -> UpdateOutcome {
        let spec = UpdateSpec::parse(&u).unwrap();
        apply_update_with_outcome(&d, &spec, &ctx()).unwrap().1
    }

    fn delta(d: Document, u: Document) -> UpdateDescription {
        match outcome(d, Bson::Document(u)) {
            UpdateOutcome::Delta(x) => x,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn operator_outcomes_follow_modified_paths() {
        let d = doc! {"_id": 1, "a": {"b": 1, "c": 1}};
        // The operator path is reported, even where diff_documents would report all of 'a'.
        let x = delta(d.clone(), doc! {"$set": {"a.b": 2}});
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("a"), f("b")], Bson::Int32(2))]
        );
        let x = delta(d.clone(), doc! {"$set": {"a": {"b": 1, "c": 2}}});
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("a")], Bson::Document(doc! {"b": 1, "c": 2}))]
        );
        // Created paths are reported at their first new component, merged.
        let x = delta(d.clone(), doc! {"$set": {"n.m.o": 1, "n.p": 2}});
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("n")], Bson::Document(doc! {"m": {"o": 1}, "p": 2}))]
        );
        let x = delta(d.clone(), doc! {"$set": {"a.z": 5}});
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("a"), f("z")], Bson::Int32(5))]
        );
        // Updates of existing fields come before creations, like the serialized diff.
        let x = delta(doc! {"_id": 1, "a": 1}, doc! {"$set": {"z": 1, "a": 2}});
        assert_eq!(
            x.updated_fields,
            vec![
                (vec![f("a")], Bson::Int32(2)),
                (vec![f("z")], Bson::Int32(1))
            ]
        );
        // Unchanged values are not reported; an exact type change is.
        assert_eq!(
            outcome(doc! {"_id": 1, "a": 1}, bson::bson!({"$set": {"a": 1}})),
            UpdateOutcome::NoOp
        );
        let x = delta(
            doc! {"_id": 1, "a": 1, "b": 1},
            doc! {"$set": {"a": 1, "b": 1.0}},
        );
        assert_eq!(x.updated_fields, vec![(vec![f("b")], Bson::Double(1.0))]);
    }

    #[test]
    fn operator_outcomes_for_unset_rename_and_arrays() {
        let d = doc! {"_id": 1, "a": 1, "arr": [1, 2], "objs": [{"v": 1}], "e": []};
        let x = delta(d.clone(), doc! {"$unset": {"a": 1, "arr.0": 1}});
        assert_eq!(x.removed_fields, vec![vec![f("a")]]);
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("arr"), PathPart::Index(0)], Bson::Null)]
        );
        let x = delta(d.clone(), doc! {"$rename": {"a": "b"}});
        assert_eq!(x.removed_fields, vec![vec![f("a")]]);
        assert_eq!(x.updated_fields, vec![(vec![f("b")], Bson::Int32(1))]);
        let x = delta(d.clone(), doc! {"$push": {"arr": {"$each": [3, 4]}}});
        assert_eq!(
            x.updated_fields,
            vec![
                (vec![f("arr"), PathPart::Index(2)], Bson::Int32(3)),
                (vec![f("arr"), PathPart::Index(3)], Bson::Int32(4))
            ]
        );
        // Pushing into an empty array, or with $sort/$slice/$position, logs the whole array.
        let x = delta(d.clone(), doc! {"$push": {"e": 1}});
        assert_eq!(x.updated_fields, vec![(vec![f("e")], bson::bson!([1]))]);
        let x = delta(
            d.clone(),
            doc! {"$push": {"arr": {"$each": [0], "$sort": 1}}},
        );
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("arr")], bson::bson!([0, 1, 2]))]
        );
        let x = delta(d.clone(), doc! {"$addToSet": {"arr": 9}});
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("arr"), PathPart::Index(2)], Bson::Int32(9))]
        );
        assert_eq!(
            outcome(d.clone(), bson::bson!({"$addToSet": {"arr": 2}})),
            UpdateOutcome::NoOp
        );
        let x = delta(d.clone(), doc! {"$pop": {"arr": 1}});
        assert_eq!(x.updated_fields, vec![(vec![f("arr")], bson::bson!([1]))]);
        let x = delta(
            d.clone(),
            doc! {"$set": {"arr.1": 7}, "$inc": {"objs.0.v": 1}},
        );
        assert_eq!(
            x.updated_fields,
            vec![
                (vec![f("arr"), PathPart::Index(1)], Bson::Int32(7)),
                (vec![f("objs"), PathPart::Index(0), f("v")], Bson::Int32(2))
            ]
        );
        assert_eq!(
            x.to_document(),
            doc! {"updatedFields": {"arr.1": 7, "objs.0.v": 2}, "removedFields": [], "truncatedArrays": []}
        );
        // Extending an array past its end logs the whole array.
        let x = delta(d, doc! {"$set": {"arr.3": 5}});
        assert_eq!(
            x.updated_fields,
            vec![(vec![f("arr")], bson::bson!([1, 2, null, 5]))]
        );
    }

    #[test]
    fn replacement_and_pipeline_outcomes() {
        let d = doc! {"_id": 1, "a": 1};
        assert_eq!(
            outcome(d.clone(), bson::bson!({"b": 1})),
            UpdateOutcome::Replacement
        );
        assert_eq!(
            outcome(d.clone(), bson::bson!({"a": 1})),
            UpdateOutcome::NoOp
        );
        // Small document: the delta would be larger than the document → replacement.
        assert_eq!(
            outcome(d.clone(), bson::bson!([{"$set": {"b": 2}}])),
            UpdateOutcome::Replacement
        );
        let big = doc! {"_id": 1, "a": 1, "s": "y".repeat(200)};
        match outcome(big, bson::bson!([{"$set": {"a": 2}}])) {
            UpdateOutcome::Delta(x) => {
                assert_eq!(x.updated_fields, vec![(vec![f("a")], Bson::Int32(2))])
            }
            other => panic!("expected a delta, got {other:?}"),
        }
    }
}

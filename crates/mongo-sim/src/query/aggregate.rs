//! Aggregation pipelines over in-memory documents.

use std::collections::BTreeMap;

use bson::{Bson, Document};

use super::compare::{values_equal, CmpKey};
use super::expr::{evaluate_optional, num_add, Variables};
use super::matcher::Matcher;
use super::projection::{AddFields, Projection};
use super::sort::SortSpec;
use crate::error::{codes, CommandError, CommandResult};

/// Inputs a pipeline needs besides the documents.
#[derive(Debug, Clone)]
pub struct PipelineContext {
    /// `$$NOW`.
    pub now: bson::DateTime,
    /// `$$CLUSTER_TIME`.
    pub cluster_time: Option<bson::Timestamp>,
    /// Command-level `let` variables.
    pub lets: std::sync::Arc<Vec<(String, Bson)>>,
}

impl PipelineContext {
    pub fn new(now: bson::DateTime) -> Self {
        PipelineContext {
            now,
            cluster_time: None,
            lets: Default::default(),
        }
    }

    fn vars(&self) -> Variables {
        let v = Variables::new(self.now).with_lets(&self.lets);
        match self.cluster_time {
            Some(ts) => v.with_cluster_time(ts),
            None => v,
        }
    }
}

fn stage_name(stage: &Document) -> CommandResult<(&str, &Bson)> {
    if stage.len() != 1 {
        return Err(CommandError::new(
            40323,
            "A pipeline stage specification object must contain exactly one field.",
        ));
    }
    let (k, v) = stage.iter().next().expect("one field");
    Ok((k.as_str(), v))
}

fn unknown_stage(name: &str) -> CommandError {
    CommandError::new(
        codes::CHANGE_STREAM_NOT_SUPPORTED_STAGE,
        format!("Unrecognized pipeline stage name: '{name}'"),
    )
}

/// Runs a pipeline over `input` and returns the output documents.
pub fn run_pipeline(
    input: Vec<Document>,
    stages: &[Document],
    ctx: &PipelineContext,
) -> CommandResult<Vec<Document>> {
    let vars = ctx.vars();
    let mut docs = input;
    for stage in stages {
        docs = run_stage(docs, stage, ctx, &vars)?;
    }
    Ok(docs)
}

fn run_stage(
    docs: Vec<Document>,
    stage: &Document,
    ctx: &PipelineContext,
    vars: &Variables,
) -> CommandResult<Vec<Document>> {
    let (name, spec) = stage_name(stage)?;
    match name {
        "$match" => {
            let Bson::Document(f) = spec else {
                return Err(CommandError::new(
                    15959,
                    "the match filter must be an expression in an object",
                ));
            };
            let m = Matcher::new(f)?
                .with_now(ctx.now)
                .with_lets(std::sync::Arc::clone(&ctx.lets));
            let mut out = Vec::with_capacity(docs.len());
            for d in docs {
                if m.try_matches(&d)? {
                    out.push(d);
                }
            }
            Ok(out)
        }
        "$sort" => {
            let Bson::Document(s) = spec else {
                return Err(CommandError::new(
                    15973,
                    "the $sort key specification must be an object",
                ));
            };
            if s.is_empty() {
                return Err(CommandError::new(
                    15976,
                    "$sort stage must have at least one sort key",
                ));
            }
            Ok(SortSpec::new(s)?.sort(docs))
        }
        "$limit" => {
            let n = non_negative_int(spec).ok_or_else(|| {
                CommandError::new(15957, "the limit must be specified as a number")
            })?;
            if n <= 0 {
                return Err(CommandError::new(15958, "the limit must be positive"));
            }
            let mut docs = docs;
            docs.truncate(n as usize);
            Ok(docs)
        }
        "$skip" => {
            let n = non_negative_int(spec)
                .ok_or_else(|| CommandError::new(15972, "Argument to $skip must be a number"))?;
            if n < 0 {
                return Err(CommandError::new(
                    15956,
                    format!("invalid argument to $skip stage: Expected a non-negative number in: $skip: {n}"),
                ));
            }
            Ok(docs.into_iter().skip(n as usize).collect())
        }
        "$project" => {
            let Bson::Document(s) = spec else {
                return Err(CommandError::new(
                    15969,
                    "$project specification must be an object",
                ));
            };
            let p = Projection::new_stage(s)?
                .with_now(ctx.now)
                .with_lets(std::sync::Arc::clone(&ctx.lets));
            docs.iter().map(|d| p.apply(d)).collect()
        }
        "$unset" => {
            let p = unset_projection(spec)?;
            docs.iter().map(|d| p.apply(d)).collect()
        }
        "$addFields" | "$set" => {
            let Bson::Document(s) = spec else {
                return Err(CommandError::new(
                    40272,
                    format!(
                        "{name} specification stage must be an object, got {}",
                        super::compare::type_name(spec)
                    ),
                ));
            };
            let af = AddFields::new(s)?;
            docs.iter().map(|d| af.apply(d, vars)).collect()
        }
        "$replaceRoot" | "$replaceWith" => {
            let expr = replace_root_expr(name, spec)?;
            docs.iter().map(|d| replace_root(expr, d, vars)).collect()
        }
        "$group" => group(docs, spec, vars),
        "$count" => {
            let Bson::String(field) = spec else {
                return Err(CommandError::new(
                    40156,
                    "the count field must be a non-empty string",
                ));
            };
            if field.is_empty() {
                return Err(CommandError::new(
                    40157,
                    "the count field must be a non-empty string",
                ));
            }
            if field.starts_with('$') {
                return Err(CommandError::new(
                    40158,
                    "the count field cannot be a $-prefixed path",
                ));
            }
            if field.contains('.') {
                return Err(CommandError::new(
                    40160,
                    "the count field cannot contain '.'",
                ));
            }
            if docs.is_empty() {
                return Ok(Vec::new());
            }
            let mut d = Document::new();
            d.insert(field.clone(), count_value(docs.len()));
            Ok(vec![d])
        }
        "$sortByCount" => {
            let ok = match spec {
                Bson::String(s) => s.starts_with('$'),
                Bson::Document(d) => {
                    d.len() == 1 && d.keys().next().is_some_and(|k| k.starts_with('$'))
                }
                _ => false,
            };
            if !ok {
                return Err(CommandError::new(
                    40148,
                    "the sortByCount field must be defined as a $-prefixed path or an expression",
                ));
            }
            let mut g = Document::new();
            g.insert("_id", spec.clone());
            let mut sum = Document::new();
            sum.insert("$sum", 1);
            g.insert("count", sum);
            let grouped = group(docs, &Bson::Document(g), vars)?;
            let mut s = Document::new();
            s.insert("count", -1);
            Ok(SortSpec::new(&s)?.sort(grouped))
        }
        "$unwind" => unwind(docs, spec),
        "$facet" => {
            let Bson::Document(f) = spec else {
                return Err(CommandError::new(
                    15947,
                    "a facet's fields must be specified in an object",
                ));
            };
            let mut out = Document::new();
            for (k, v) in f {
                let Bson::Array(sub) = v else {
                    return Err(CommandError::new(
                        40170,
                        format!(
                            "arguments to $facet must be arrays, {k} is type {}",
                            super::compare::type_name(v)
                        ),
                    ));
                };
                let mut stages = Vec::new();
                for s in sub {
                    match s {
                        Bson::Document(d) => stages.push(d.clone()),
                        _ => {
                            return Err(CommandError::new(
                                40171,
                                "subpipeline stages must be objects",
                            ))
                        }
                    }
                }
                let r = run_pipeline(docs.clone(), &stages, ctx)?;
                out.insert(
                    k.clone(),
                    Bson::Array(r.into_iter().map(Bson::Document).collect()),
                );
            }
            Ok(vec![out])
        }
        "$lookup" | "$graphLookup" | "$out" | "$merge" | "$bucket" | "$bucketAuto" | "$sample"
        | "$geoNear" | "$unionWith" | "$densify" | "$fill" | "$setWindowFields" | "$redact"
        | "$indexStats" | "$collStats" | "$currentOp" | "$listSessions" | "$search"
        | "$changeStream" | "$documents" => Err(CommandError::new(
            codes::COMMAND_NOT_SUPPORTED,
            format!("The {name} stage is not supported by mongo-sim"),
        )),
        other => Err(unknown_stage(other)),
    }
}

fn count_value(n: usize) -> Bson {
    match i32::try_from(n) {
        Ok(i) => Bson::Int32(i),
        Err(_) => Bson::Int64(n as i64),
    }
}

fn non_negative_int(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(d) if d.fract() == 0.0 && d.is_finite() => Some(*d as i64),
        Bson::Decimal128(_) => {
            let f = super::expr::num_to_f64(v);
            (f.fract() == 0.0 && f.is_finite()).then_some(f as i64)
        }
        _ => None,
    }
}

fn unset_projection(spec: &Bson) -> CommandResult<Projection> {
    let paths: Vec<String> = match spec {
        Bson::String(s) => vec![s.clone()],
        Bson::Array(a) => {
            let mut out = Vec::new();
            for e in a {
                match e {
                    Bson::String(s) => out.push(s.clone()),
                    _ => {
                        return Err(CommandError::new(
                            31120,
                            "$unset specification must be a string or an array containing only string values",
                        ))
                    }
                }
            }
            if out.is_empty() {
                return Err(CommandError::new(
                    31119,
                    "$unset specification must be a string or an array with at least one field",
                ));
            }
            out
        }
        _ => {
            return Err(CommandError::new(
                31002,
                "$unset specification must be a string or an array",
            ))
        }
    };
    Projection::exclusion(&paths)
}

fn replace_root_expr<'a>(name: &str, spec: &'a Bson) -> CommandResult<&'a Bson> {
    if name == "$replaceWith" {
        return Ok(spec);
    }
    match spec {
        Bson::Document(d) => {
            for k in d.keys() {
                if k != "newRoot" {
                    return Err(CommandError::new(
                        40415,
                        format!("BSON field '$replaceRoot.{k}' is an unknown field."),
                    ));
                }
            }
            d.get("newRoot").ok_or_else(|| {
                CommandError::new(
                    40414,
                    "BSON field '$replaceRoot.newRoot' is missing but a required field",
                )
            })
        }
        _ => Err(CommandError::new(
            40228,
            "the $replaceRoot stage specification must be an object",
        )),
    }
}

fn replace_root(expr: &Bson, doc: &Document, vars: &Variables) -> CommandResult<Document> {
    match evaluate_optional(expr, doc, vars)? {
        Some(Bson::Document(d)) => Ok(d),
        other => {
            let (shown, t) = match &other {
                None => ("MISSING".to_string(), "missing"),
                Some(b) => (b.to_string(), super::compare::type_name(b)),
            };
            Err(CommandError::new(
                40228,
                format!(
                    "'replacement document' must evaluate to an object, but resulting value was: {shown}. Type of resulting value: '{t}'. Input document: {doc}"
                ),
            ))
        }
    }
}

enum Acc {
    Sum(Bson),
    Avg(Bson, usize),
    MinMax(bool, Option<Bson>),
    First(Option<Bson>),
    Last(Bson),
    Push(Vec<Bson>),
    AddToSet(Vec<Bson>),
    MergeObjects(Document),
}

fn group(docs: Vec<Document>, spec: &Bson, vars: &Variables) -> CommandResult<Vec<Document>> {
    let Bson::Document(spec) = spec else {
        return Err(CommandError::new(
            15947,
            "a group's fields must be specified in an object",
        ));
    };
    let Some(id_expr) = spec.get("_id") else {
        return Err(CommandError::new(
            15955,
            "a group specification must include an _id",
        ));
    };
    let mut accs: Vec<(String, String, Bson)> = Vec::new();
    for (k, v) in spec {
        if k == "_id" {
            continue;
        }
        if k.contains('.') {
            return Err(CommandError::new(
                40235,
                format!("The field name '{k}' cannot contain '.'"),
            ));
        }
        if k.starts_with('$') {
            return Err(CommandError::new(
                40236,
                format!("The field name '{k}' cannot be an operator name"),
            ));
        }
        let Bson::Document(d) = v else {
            return Err(CommandError::new(
                40234,
                format!("The field '{k}' must be an accumulator object"),
            ));
        };
        if d.len() != 1 {
            return Err(CommandError::new(
                40238,
                format!("The field '{k}' must specify one accumulator"),
            ));
        }
        let (op, arg) = d.iter().next().expect("one");
        match op.as_str() {
            "$sum" | "$avg" | "$min" | "$max" | "$first" | "$last" | "$push" | "$addToSet"
            | "$mergeObjects" => {}
            "$count" => {
                if !matches!(arg, Bson::Document(a) if a.is_empty()) {
                    return Err(CommandError::new(
                        codes::TYPE_MISMATCH,
                        "$count takes no arguments, i.e. $count:{}",
                    ));
                }
            }
            other => {
                return Err(CommandError::new(
                    15952,
                    format!("unknown group operator '{other}'"),
                ))
            }
        }
        accs.push((k.clone(), op.clone(), arg.clone()));
    }
    let new_accs = || -> Vec<Acc> {
        accs.iter()
            .map(|(_, op, _)| match op.as_str() {
                "$sum" | "$count" => Acc::Sum(Bson::Int32(0)),
                "$avg" => Acc::Avg(Bson::Int32(0), 0),
                "$min" => Acc::MinMax(false, None),
                "$max" => Acc::MinMax(true, None),
                "$first" => Acc::First(None),
                "$last" => Acc::Last(Bson::Null),
                "$push" => Acc::Push(Vec::new()),
                "$addToSet" => Acc::AddToSet(Vec::new()),
                _ => Acc::MergeObjects(Document::new()),
            })
            .collect()
    };
    let mut index: BTreeMap<CmpKey, usize> = BTreeMap::new();
    let mut groups: Vec<(Bson, Vec<Acc>)> = Vec::new();
    let one = Bson::Int32(1);
    for d in &docs {
        let key = evaluate_optional(id_expr, d, vars)?.unwrap_or(Bson::Null);
        let gi = match index.get(&CmpKey(key.clone())) {
            Some(i) => *i,
            None => {
                groups.push((key.clone(), new_accs()));
                index.insert(CmpKey(key), groups.len() - 1);
                groups.len() - 1
            }
        };
        for (ai, (_, op, arg)) in accs.iter().enumerate() {
            let v = if op == "$count" {
                Some(one.clone())
            } else {
                evaluate_optional(arg, d, vars)?
            };
            let acc = &mut groups[gi].1[ai];
            match acc {
                Acc::Sum(s) => {
                    if let Some(x) = &v {
                        if super::compare::is_number(x) {
                            *s = num_add(s, x);
                        }
                    }
                }
                Acc::Avg(s, n) => {
                    if let Some(x) = &v {
                        if super::compare::is_number(x) {
                            *s = num_add(s, x);
                            *n += 1;
                        }
                    }
                }
                Acc::MinMax(is_max, best) => {
                    if let Some(x) = v {
                        if !matches!(x, Bson::Null | Bson::Undefined) {
                            let want = if *is_max {
                                std::cmp::Ordering::Greater
                            } else {
                                std::cmp::Ordering::Less
                            };
                            let replace = match best {
                                None => true,
                                Some(b) => super::compare::compare_values(&x, b) == want,
                            };
                            if replace {
                                *best = Some(x);
                            }
                        }
                    }
                }
                Acc::First(f) => {
                    if f.is_none() {
                        *f = Some(v.unwrap_or(Bson::Null));
                    }
                }
                Acc::Last(l) => *l = v.unwrap_or(Bson::Null),
                Acc::Push(p) => {
                    if let Some(x) = v {
                        p.push(x);
                    }
                }
                Acc::AddToSet(s) => {
                    if let Some(x) = v {
                        if !s.iter().any(|e| values_equal(e, &x)) {
                            s.push(x);
                        }
                    }
                }
                Acc::MergeObjects(m) => match v {
                    None | Some(Bson::Null) => {}
                    Some(Bson::Document(o)) => {
                        for (k, val) in o {
                            m.insert(k, val);
                        }
                    }
                    Some(other) => {
                        return Err(CommandError::new(
                            40400,
                            format!(
                            "$mergeObjects requires object inputs, but input {other} is of type {}",
                            super::compare::type_name(&other)
                        ),
                        ))
                    }
                },
            }
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    for (key, accs_v) in groups {
        let mut d = Document::new();
        d.insert("_id", key);
        for ((name, _, _), acc) in accs.iter().zip(accs_v) {
            let v = match acc {
                Acc::Sum(s) => s,
                Acc::Avg(s, n) => {
                    if n == 0 {
                        Bson::Null
                    } else {
                        match s {
                            Bson::Decimal128(_) => {
                                super::expr::f64_to_decimal(super::expr::num_to_f64(&s) / n as f64)
                            }
                            other => Bson::Double(super::expr::num_to_f64(&other) / n as f64),
                        }
                    }
                }
                Acc::MinMax(_, b) => b.unwrap_or(Bson::Null),
                Acc::First(f) => f.unwrap_or(Bson::Null),
                Acc::Last(l) => l,
                Acc::Push(p) | Acc::AddToSet(p) => Bson::Array(p),
                Acc::MergeObjects(m) => Bson::Document(m),
            };
            d.insert(name.clone(), v);
        }
        out.push(d);
    }
    Ok(out)
}

fn unwind(docs: Vec<Document>, spec: &Bson) -> CommandResult<Vec<Document>> {
    let (path, include_index, preserve) = match spec {
        Bson::String(s) => (s.clone(), None, false),
        Bson::Document(d) => {
            let mut path = None;
            let mut idx = None;
            let mut preserve = false;
            for (k, v) in d {
                match (k.as_str(), v) {
                    ("path", Bson::String(s)) => path = Some(s.clone()),
                    ("path", _) => {
                        return Err(CommandError::new(28808, "expected a string as the path for $unwind stage"))
                    }
                    ("includeArrayIndex", Bson::String(s)) => {
                        if s.is_empty() || s.starts_with('$') {
                            return Err(CommandError::new(
                                28822,
                                format!("includeArrayIndex option to $unwind stage should not be prefixed with a '$': {s}"),
                            ));
                        }
                        idx = Some(s.clone())
                    }
                    ("includeArrayIndex", _) => {
                        return Err(CommandError::new(28810, "expected a non-empty string for the includeArrayIndex option to $unwind stage"))
                    }
                    ("preserveNullAndEmptyArrays", Bson::Boolean(b)) => preserve = *b,
                    ("preserveNullAndEmptyArrays", _) => {
                        return Err(CommandError::new(28809, "expected a boolean for the preserveNullAndEmptyArrays option to $unwind stage"))
                    }
                    (other, _) => {
                        return Err(CommandError::new(28811, format!("unrecognized option to $unwind stage: {other}")))
                    }
                }
            }
            let Some(path) = path else {
                return Err(CommandError::new(
                    28812,
                    "no path specified to $unwind stage",
                ));
            };
            (path, idx, preserve)
        }
        _ => {
            return Err(CommandError::new(
                15981,
                "expected either a string or an object as specification for $unwind stage",
            ))
        }
    };
    let Some(field) = path.strip_prefix('$') else {
        return Err(CommandError::new(
            28818,
            format!("path option to $unwind stage should be prefixed with a '$': {path}"),
        ));
    };
    let mut out = Vec::new();
    for d in docs {
        let value = get_through_documents(&d, field);
        match value {
            Some(Bson::Array(arr)) if !arr.is_empty() => {
                let arr = arr.clone();
                for (i, e) in arr.into_iter().enumerate() {
                    let mut nd = d.clone();
                    super::path::set_path(&mut nd, field, e)?;
                    if let Some(ix) = &include_index {
                        super::path::set_path(&mut nd, ix, Bson::Int64(i as i64))?;
                    }
                    out.push(nd);
                }
            }
            Some(Bson::Array(_)) | Some(Bson::Null) | Some(Bson::Undefined) | None => {
                if preserve {
                    let mut nd = d.clone();
                    if let Some(Bson::Array(_)) = value {
                        // An empty array is removed from the preserved document.
                        super::path::unset_path(&mut nd, field);
                    }
                    if let Some(ix) = &include_index {
                        super::path::set_path(&mut nd, ix, Bson::Null)?;
                    }
                    out.push(nd);
                }
            }
            Some(_) => {
                let mut nd = d.clone();
                if let Some(ix) = &include_index {
                    super::path::set_path(&mut nd, ix, Bson::Null)?;
                }
                out.push(nd);
            }
        }
    }
    Ok(out)
}

/// Gets a dotted path only through sub-documents (no array traversal), as `$unwind` does.
fn get_through_documents<'a>(d: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut cur = d.get(parts.next()?)?;
    for p in parts {
        match cur {
            Bson::Document(sd) => cur = sd.get(p)?,
            _ => return None,
        }
    }
    Some(cur)
}

/// Runs the stages of a pipeline-style update against one document and returns the result
/// (before `_id` checks). Only `$addFields`/`$set`, `$project`, `$unset`, `$replaceRoot` and
/// `$replaceWith` are allowed, like the server.
pub fn apply_update_pipeline(
    original: &Document,
    stages: &[Document],
    ctx: &PipelineContext,
) -> CommandResult<Document> {
    let vars = ctx.vars();
    let mut doc = original.clone();
    for stage in stages {
        let (name, spec) = stage_name(stage)?;
        match name {
            "$addFields" | "$set" | "$project" | "$unset" | "$replaceRoot" | "$replaceWith" => {}
            other => {
                return Err(CommandError::new(
                    codes::INVALID_OPTIONS,
                    format!("{other} is not allowed to be used within an update"),
                ))
            }
        }
        let mut out = run_stage(vec![doc], stage, ctx, &vars)?;
        let _ = spec;
        doc = out.pop().ok_or_else(|| {
            CommandError::new(
                codes::INTERNAL_ERROR,
                "update pipeline produced no document",
            )
        })?;
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn ctx() -> PipelineContext {
        PipelineContext::new(bson::DateTime::from_millis(42))
    }

    fn run(input: Vec<Document>, stages: Vec<Document>) -> CommandResult<Vec<Document>> {
        run_pipeline(input, &stages, &ctx())
    }

    fn sample() -> Vec<Document> {
        vec![
            doc! {"_id": 1, "cat": "a", "n": 1, "tags": ["x", "y"]},
            doc! {"_id": 2, "cat": "b", "n": 2, "tags": []},
            doc! {"_id": 3, "cat": "a", "n": 3.5},
            doc! {"_id": 4, "cat": null, "n": "str", "tags": "solo"},
        ]
    }

    #[test]
    fn expression_objects_refuse_dotted_keys_as_the_server_does() {
        for stage in [
            doc! {"$replaceWith": {"_id": 1, "a.b.c": 3}},
            doc! {"$replaceWith": {"$mergeObjects": ["$$ROOT", {"a.b": 1}]}},
            doc! {"$group": {"_id": {"c.d": "$cat"}}},
        ] {
            let e = run(sample(), vec![stage.clone()]).unwrap_err();
            assert_eq!(e.code, 16412, "{stage}");
            assert!(e.message.contains("may not contain '.'"), "{}", e.message);
        }
        // Stage specs take paths; $literal and $setField reach dotted names.
        let r = run(
            vec![doc! {"_id": 1}],
            vec![
                doc! {"$set": {"s.t": 1}},
                doc! {"$replaceWith": {"$setField": {"field": "x.y", "input": "$$ROOT", "value": {"$literal": 2}}}},
            ],
        )
        .unwrap();
        assert_eq!(r, vec![doc! {"_id": 1, "s": {"t": 1}, "x.y": 2}]);
    }

    #[test]
    fn match_sort_skip_limit() {
        let r = run(
            sample(),
            vec![
                doc! {"$match": {"n": {"$gte": 1}}},
                doc! {"$sort": {"n": -1}},
                doc! {"$skip": 1},
                doc! {"$limit": 1},
            ],
        )
        .unwrap();
        assert_eq!(r, vec![doc! {"_id": 2, "cat": "b", "n": 2, "tags": []}]);
        assert_eq!(
            run(sample(), vec![doc! {"$limit": 0}]).unwrap_err().code,
            15958
        );
        assert_eq!(
            run(sample(), vec![doc! {"$skip": -1}]).unwrap_err().code,
            15956
        );
        assert_eq!(
            run(sample(), vec![doc! {"$sort": {}}]).unwrap_err().code,
            15976
        );
    }

    #[test]
    fn count_documents_pipeline_from_rust_driver() {
        let stages = vec![
            doc! {"$match": {"cat": "a"}},
            doc! {"$skip": 0i64},
            doc! {"$limit": 10i64},
            doc! {"$group": {"_id": 1, "n": {"$sum": 1}}},
        ];
        assert_eq!(
            run(sample(), stages.clone()).unwrap(),
            vec![doc! {"_id": 1, "n": 2}]
        );
        // No match → no group output (the driver turns that into 0).
        let stages = vec![
            doc! {"$match": {"cat": "zzz"}},
            doc! {"$group": {"_id": 1, "n": {"$sum": 1}}},
        ];
        assert!(run(sample(), stages).unwrap().is_empty());
    }

    #[test]
    fn group_accumulators() {
        let r = run(
            sample(),
            vec![doc! {"$group": {
                "_id": "$cat",
                "sum": {"$sum": "$n"},
                "avg": {"$avg": "$n"},
                "min": {"$min": "$n"},
                "max": {"$max": "$n"},
                "first": {"$first": "$_id"},
                "last": {"$last": "$_id"},
                "ids": {"$push": "$_id"},
                "set": {"$addToSet": "$cat"},
                "count": {"$count": {}},
            }}],
        )
        .unwrap();
        assert_eq!(
            r[0],
            doc! {"_id": "a", "sum": 4.5, "avg": 2.25, "min": 1, "max": 3.5, "first": 1, "last": 3, "ids": [1, 3], "set": ["a"], "count": 1 + 1}
        );
        assert_eq!(
            r[2],
            doc! {"_id": null, "sum": 0, "avg": null, "min": "str", "max": "str", "first": 4, "last": 4, "ids": [4], "set": [null], "count": 1}
        );
        // Group keys compare numerically (1 and 1.0 are one group) and may be documents.
        let docs = vec![doc! {"k": 1}, doc! {"k": 1.0}, doc! {"k": 2i64}];
        let r = run(
            docs.clone(),
            vec![doc! {"$group": {"_id": "$k", "c": {"$sum": 1}}}],
        )
        .unwrap();
        assert_eq!(r, vec![doc! {"_id": 1, "c": 2}, doc! {"_id": 2i64, "c": 1}]);
        let r = run(
            docs,
            vec![doc! {"$group": {"_id": {"kk": "$k"}, "c": {"$sum": 1}}}],
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], doc! {"_id": {"kk": 1}, "c": 2});
        assert_eq!(
            run(sample(), vec![doc! {"$group": {"n": {"$sum": 1}}}])
                .unwrap_err()
                .code,
            15955
        );
        assert_eq!(
            run(
                sample(),
                vec![doc! {"$group": {"_id": 1, "n": {"$foo": 1}}}]
            )
            .unwrap_err()
            .code,
            15952
        );
    }

    #[test]
    fn sum_overflow_promotes() {
        let docs = vec![doc! {"v": i32::MAX}, doc! {"v": 1}];
        let r = run(
            docs,
            vec![doc! {"$group": {"_id": null, "s": {"$sum": "$v"}}}],
        )
        .unwrap();
        assert_eq!(r[0].get("s"), Some(&Bson::Int64(i32::MAX as i64 + 1)));
        let docs = vec![doc! {"v": 1}, doc! {"v": 2}];
        let r = run(
            docs,
            vec![doc! {"$group": {"_id": null, "s": {"$sum": "$v"}}}],
        )
        .unwrap();
        assert_eq!(r[0].get("s"), Some(&Bson::Int32(3)));
    }

    #[test]
    fn count_and_sort_by_count() {
        assert_eq!(
            run(sample(), vec![doc! {"$count": "total"}]).unwrap(),
            vec![doc! {"total": 4}]
        );
        assert!(run(vec![], vec![doc! {"$count": "total"}])
            .unwrap()
            .is_empty());
        assert_eq!(
            run(sample(), vec![doc! {"$count": "a.b"}])
                .unwrap_err()
                .code,
            40160
        );
        let r = run(sample(), vec![doc! {"$sortByCount": "$cat"}]).unwrap();
        assert_eq!(r[0], doc! {"_id": "a", "count": 2});
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn unwind_forms() {
        let r = run(sample(), vec![doc! {"$unwind": "$tags"}]).unwrap();
        assert_eq!(
            r,
            vec![
                doc! {"_id": 1, "cat": "a", "n": 1, "tags": "x"},
                doc! {"_id": 1, "cat": "a", "n": 1, "tags": "y"},
                doc! {"_id": 4, "cat": null, "n": "str", "tags": "solo"},
            ]
        );
        let r = run(
            sample(),
            vec![doc! {"$unwind": {"path": "$tags", "includeArrayIndex": "i", "preserveNullAndEmptyArrays": true}}],
        )
        .unwrap();
        assert_eq!(r.len(), 5);
        assert_eq!(
            r[1],
            doc! {"_id": 1, "cat": "a", "n": 1, "tags": "y", "i": 1i64}
        );
        assert_eq!(r[2], doc! {"_id": 2, "cat": "b", "n": 2, "i": null});
        assert_eq!(r[3], doc! {"_id": 3, "cat": "a", "n": 3.5, "i": null});
        assert_eq!(
            r[4],
            doc! {"_id": 4, "cat": null, "n": "str", "tags": "solo", "i": null}
        );
        assert_eq!(
            run(sample(), vec![doc! {"$unwind": "tags"}])
                .unwrap_err()
                .code,
            28818
        );
        let nested = vec![doc! {"_id": 1, "a": {"b": [1, 2]}}];
        let r = run(nested, vec![doc! {"$unwind": "$a.b"}]).unwrap();
        assert_eq!(
            r,
            vec![
                doc! {"_id": 1, "a": {"b": 1}},
                doc! {"_id": 1, "a": {"b": 2}}
            ]
        );
    }

    #[test]
    fn project_add_fields_unset_replace() {
        let d = vec![doc! {"_id": 1, "a": 1, "b": {"c": 2, "d": 3}}];
        assert_eq!(
            run(
                d.clone(),
                vec![doc! {"$project": {"a": 1, "x": {"$add": ["$a", "$b.c"]}}}]
            )
            .unwrap(),
            vec![doc! {"_id": 1, "a": 1, "x": 3}]
        );
        assert_eq!(
            run(d.clone(), vec![doc! {"$set": {"a": 5, "z": "$$NOW"}}]).unwrap(),
            vec![
                doc! {"_id": 1, "a": 5, "b": {"c": 2, "d": 3}, "z": bson::DateTime::from_millis(42)}
            ]
        );
        assert_eq!(
            run(d.clone(), vec![doc! {"$unset": ["a", "b.c"]}]).unwrap(),
            vec![doc! {"_id": 1, "b": {"d": 3}}]
        );
        assert_eq!(
            run(d.clone(), vec![doc! {"$unset": "a"}]).unwrap(),
            vec![doc! {"_id": 1, "b": {"c": 2, "d": 3}}]
        );
        assert_eq!(
            run(d.clone(), vec![doc! {"$replaceRoot": {"newRoot": "$b"}}]).unwrap(),
            vec![doc! {"c": 2, "d": 3}]
        );
        assert_eq!(
            run(
                d.clone(),
                vec![doc! {"$replaceWith": {"$mergeObjects": ["$b", {"id": "$_id"}]}}]
            )
            .unwrap(),
            vec![doc! {"c": 2, "d": 3, "id": 1}]
        );
        assert_eq!(
            run(d.clone(), vec![doc! {"$replaceWith": "$a"}])
                .unwrap_err()
                .code,
            40228
        );
        assert_eq!(
            run(d.clone(), vec![doc! {"$project": {}}])
                .unwrap_err()
                .code,
            51272
        );
    }

    #[test]
    fn facet_and_errors() {
        let r = run(
            sample(),
            vec![doc! {"$facet": {"count": [{"$count": "n"}], "firstTwo": [{"$limit": 2}, {"$project": {"_id": 1}}]}}],
        )
        .unwrap();
        assert_eq!(
            r,
            vec![doc! {"count": [{"n": 4}], "firstTwo": [{"_id": 1}, {"_id": 2}]}]
        );
        let e = run(sample(), vec![doc! {"$foo": {}}]).unwrap_err();
        assert_eq!(e.code, 40324);
        assert_eq!(e.message, "Unrecognized pipeline stage name: '$foo'");
        assert_eq!(
            run(sample(), vec![doc! {"$match": {}, "$limit": 1}])
                .unwrap_err()
                .code,
            40323
        );
        assert_eq!(
            run(sample(), vec![doc! {"$lookup": {}}]).unwrap_err().code,
            115
        );
    }

    #[test]
    fn update_pipeline_stage_restrictions() {
        let d = doc! {"_id": 1, "a": 1};
        assert_eq!(
            apply_update_pipeline(&d, &[doc! {"$match": {}}], &ctx())
                .unwrap_err()
                .code,
            72
        );
        assert_eq!(
            apply_update_pipeline(
                &d,
                &[doc! {"$set": {"b": "$a"}}, doc! {"$unset": "a"}],
                &ctx()
            )
            .unwrap(),
            doc! {"_id": 1, "b": 1}
        );
    }
}

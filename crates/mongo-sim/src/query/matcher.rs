//! Query filter matching (`find`, `$match`, update/delete filters, `$pull` conditions).
//!
//! A filter is compiled once by [`Matcher::new`] into a tree of predicates; matching a document
//! walks the tree without re-parsing.

use std::cmp::Ordering;

use bson::{Bson, Document};
use regex::Regex;

use super::compare::{canonical_type_rank, compare_values, is_nan, type_number};
use super::expr::{evaluate_optional, is_truthy, Variables};
use super::path::query_values;
use crate::error::{codes, CommandError, CommandResult};

/// A compiled query filter.
#[derive(Debug, Clone)]
pub struct Matcher {
    root: Node,
    id_eq: Option<Bson>,
    now: Option<bson::DateTime>,
    has_expr: bool,
    /// Command-level `let` variables, visible to `$expr`.
    lets: std::sync::Arc<Vec<(String, Bson)>>,
}

#[derive(Debug, Clone)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Nor(Vec<Node>),
    Path { path: Vec<String>, pred: Pred },
    Expr(Bson),
    Const(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Lt,
    Lte,
    Gt,
    Gte,
}

/// A predicate on the value(s) found at a path.
#[derive(Debug, Clone)]
enum Pred {
    Eq(Bson),
    Cmp(CmpOp, Bson),
    /// `values` is sorted by `compare_values` and deduplicated, so membership is a binary
    /// search (large `$in` lists are common for batched `_id` lookups).
    In {
        values: Vec<Bson>,
        has_null: bool,
        regexes: Vec<CompiledRegex>,
    },
    Exists(bool),
    Type(Vec<TypeSel>),
    Regex(CompiledRegex),
    Size(i64),
    /// `$all`: every element predicate matches (each is an Eq, Regex or ElemMatch).
    All(Vec<Pred>),
    Mod(i64, i64),
    ElemMatchValue(Vec<Pred>),
    ElemMatchObject(Box<Node>),
    Not(Box<Pred>),
    AndPreds(Vec<Pred>),
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeSel {
    Number,
    Code(i32),
}

/// A regex together with its source (for equality to stored regex values).
#[derive(Debug, Clone)]
pub struct CompiledRegex {
    pub pattern: String,
    pub options: String,
    re: Regex,
}

impl CompiledRegex {
    /// Compiles a MongoDB regex (`i`, `m`, `s`, `x` options; `u` is implied).
    pub fn new(pattern: &str, options: &str) -> CommandResult<Self> {
        let mut flags = String::new();
        for c in options.chars() {
            match c {
                'i' | 'm' | 's' | 'x' => {
                    if !flags.contains(c) {
                        flags.push(c)
                    }
                }
                'u' => {}
                other => {
                    return Err(CommandError::new(
                        51108,
                        format!("invalid flag in regex options: {other}"),
                    ))
                }
            }
        }
        let src = if flags.is_empty() {
            pattern.to_string()
        } else {
            format!("(?{flags}){pattern}")
        };
        let re = Regex::new(&src)
            .map_err(|e| CommandError::new(51091, format!("Regular expression is invalid: {e}")))?;
        Ok(CompiledRegex {
            pattern: pattern.to_string(),
            options: options.to_string(),
            re,
        })
    }

    /// Whether a single value matches: strings/symbols by search, regex values by equality.
    pub fn matches_value(&self, v: &Bson) -> bool {
        match v {
            Bson::String(s) | Bson::Symbol(s) => self.re.is_match(s),
            Bson::RegularExpression(r) => {
                r.pattern.as_str() == self.pattern && r.options.as_str() == sorted(&self.options)
            }
            _ => false,
        }
    }

    /// Whether a string matches.
    pub fn is_match(&self, s: &str) -> bool {
        self.re.is_match(s)
    }
}

fn sorted(s: &str) -> String {
    let mut c: Vec<char> = s.chars().collect();
    c.sort_unstable();
    c.into_iter().collect()
}

fn bad(msg: impl Into<String>) -> CommandError {
    CommandError::bad_value(msg)
}

impl Matcher {
    /// Compiles a filter document.
    pub fn new(filter: &Document) -> CommandResult<Matcher> {
        let root = parse_doc(filter, true)?;
        let id_eq = compute_id_equality(filter);
        Ok(Matcher {
            has_expr: contains_expr(&root),
            root,
            id_eq,
            now: None,
            lets: Default::default(),
        })
    }

    /// Sets `$$NOW` for `$expr` (default: the wall clock at evaluation time).
    pub fn with_now(mut self, now: bson::DateTime) -> Self {
        self.now = Some(now);
        self
    }

    /// Binds the command's `let` variables for `$expr`.
    pub fn with_lets(mut self, lets: std::sync::Arc<Vec<(String, Bson)>>) -> Self {
        self.lets = lets;
        self
    }

    /// Whether the document matches. `$expr` runtime errors count as "no match"; use
    /// [`Matcher::try_matches`] to see them.
    pub fn matches(&self, doc: &Document) -> bool {
        self.try_matches(doc).unwrap_or(false)
    }

    /// Whether the document matches, surfacing `$expr` evaluation errors.
    pub fn try_matches(&self, doc: &Document) -> CommandResult<bool> {
        // Only $expr reads $$NOW; avoid a clock read per document otherwise.
        let now = match self.now {
            Some(n) => n,
            None if self.has_expr => bson::DateTime::now(),
            None => bson::DateTime::from_millis(0),
        };
        if self.lets.is_empty() {
            match_node(&self.root, doc, &Variables::new(now))
        } else {
            match_node(&self.root, doc, &Variables::new(now).with_lets(&self.lets))
        }
    }

    /// The `_id` value when the filter is exactly `{_id: <scalar>}` or `{_id: {$eq: v}}`.
    pub fn id_equality(&self) -> Option<&Bson> {
        self.id_eq.as_ref()
    }

    /// The candidate `_id` values when the filter is exactly `{_id: {$in: [...]}}` without
    /// regexes (sorted by `compare_values`, deduplicated). Storage can answer such filters
    /// with index lookups; each returned value is an exact `_id` equality candidate.
    pub fn id_in_list(&self) -> Option<&[Bson]> {
        match &self.root {
            Node::Path { path, pred } if path.len() == 1 && path[0] == "_id" => match pred {
                Pred::In {
                    values, regexes, ..
                } if regexes.is_empty() && !values.iter().any(|v| matches!(v, Bson::Array(_))) => {
                    Some(values)
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether a single value (not a document) matches a `$pull`-style value condition:
    /// the value is wrapped as the only field of a document and the filter's operators are
    /// applied to it (so `{$gte: 6}` or `{$in: [..]}`).
    pub fn value_condition(cond: &Document) -> CommandResult<ValueMatcher> {
        let pred = parse_operator_object(cond)?;
        Ok(ValueMatcher { pred })
    }
}

/// A compiled operator object applied to standalone values (used by `$pull`).
#[derive(Debug, Clone)]
pub struct ValueMatcher {
    pred: Pred,
}

impl ValueMatcher {
    pub fn matches(&self, v: &Bson) -> bool {
        let vars = Variables::default();
        pred_matches(&self.pred, &[Some(v)], &vars, true).unwrap_or(false)
    }
}

fn contains_expr(n: &Node) -> bool {
    match n {
        Node::Expr(_) => true,
        Node::And(c) | Node::Or(c) | Node::Nor(c) => c.iter().any(contains_expr),
        Node::Path { pred, .. } => pred_contains_expr(pred),
        Node::Const(_) => false,
    }
}

fn pred_contains_expr(p: &Pred) -> bool {
    match p {
        Pred::ElemMatchObject(n) => contains_expr(n),
        Pred::ElemMatchValue(v) | Pred::All(v) | Pred::AndPreds(v) => {
            v.iter().any(pred_contains_expr)
        }
        Pred::Not(p) => pred_contains_expr(p),
        _ => false,
    }
}

fn compute_id_equality(filter: &Document) -> Option<Bson> {
    if filter.len() != 1 {
        return None;
    }
    let v = filter.get("_id")?;
    match v {
        Bson::Document(d) => {
            if d.len() == 1 {
                match d.get("$eq") {
                    Some(Bson::Array(_)) | Some(Bson::RegularExpression(_)) | None => None,
                    Some(x) => Some(x.clone()),
                }
            } else {
                None
            }
        }
        Bson::Array(_) | Bson::RegularExpression(_) => None,
        other => Some(other.clone()),
    }
}

fn parse_doc(filter: &Document, top_level: bool) -> CommandResult<Node> {
    let mut children = Vec::with_capacity(filter.len());
    for (k, v) in filter {
        if let Some(op) = k.strip_prefix('$') {
            match op {
                "and" | "or" | "nor" => {
                    let Bson::Array(arr) = v else {
                        return Err(bad(format!("${op} must be an array")));
                    };
                    if arr.is_empty() {
                        return Err(bad("$and/$or/$nor must be a nonempty array"));
                    }
                    let mut subs = Vec::with_capacity(arr.len());
                    for e in arr {
                        let Bson::Document(d) = e else {
                            return Err(bad("$or/$and/$nor entries need to be full objects"));
                        };
                        subs.push(parse_doc(d, false)?);
                    }
                    children.push(match op {
                        "and" => Node::And(subs),
                        "or" => Node::Or(subs),
                        _ => Node::Nor(subs),
                    });
                }
                "expr" => children.push(Node::Expr(v.clone())),
                "comment" => {}
                "alwaysTrue" => children.push(Node::Const(true)),
                "alwaysFalse" => children.push(Node::Const(false)),
                "where" | "text" | "jsonSchema" | "sampleRate" => {
                    return Err(CommandError::new(
                        codes::BAD_VALUE,
                        format!("${op} is not supported by mongo-sim"),
                    ))
                }
                _ if top_level => return Err(bad(format!("unknown top level operator: {k}"))),
                _ => return Err(bad(format!("unknown operator: {k}"))),
            }
        } else {
            let path: Vec<String> = k.split('.').map(String::from).collect();
            let pred = parse_field_value(v)?;
            children.push(Node::Path { path, pred });
        }
    }
    Ok(if children.len() == 1 {
        children.pop().expect("one child")
    } else {
        Node::And(children)
    })
}

/// Whether an object is an operator object (`{$gt: 1}`) rather than a literal document.
fn is_operator_object(d: &Document) -> bool {
    d.keys().next().is_some_and(|k| k.starts_with('$'))
}

fn parse_field_value(v: &Bson) -> CommandResult<Pred> {
    match v {
        Bson::RegularExpression(r) => Ok(Pred::Regex(CompiledRegex::new(
            r.pattern.as_str(),
            r.options.as_str(),
        )?)),
        Bson::Document(d) if is_operator_object(d) => parse_operator_object(d),
        other => Ok(Pred::Eq(other.clone())),
    }
}

fn parse_operator_object(d: &Document) -> CommandResult<Pred> {
    let mut preds = Vec::with_capacity(d.len());
    let mut regex_src: Option<(String, String)> = None;
    let mut options: Option<String> = None;
    for (k, v) in d {
        match k.as_str() {
            "$eq" => preds.push(Pred::Eq(v.clone())),
            "$ne" => preds.push(Pred::Not(Box::new(Pred::Eq(v.clone())))),
            "$gt" | "$gte" | "$lt" | "$lte" => {
                if let Bson::RegularExpression(_) = v {
                    return Err(bad(format!("Can't have RegEx as arg to {k}")));
                }
                let op = match k.as_str() {
                    "$gt" => CmpOp::Gt,
                    "$gte" => CmpOp::Gte,
                    "$lt" => CmpOp::Lt,
                    _ => CmpOp::Lte,
                };
                preds.push(Pred::Cmp(op, v.clone()));
            }
            "$in" | "$nin" => {
                let Bson::Array(arr) = v else {
                    return Err(bad(format!("{k} needs an array")));
                };
                let mut values: Vec<Bson> = Vec::new();
                let mut regexes = Vec::new();
                for e in arr {
                    match e {
                        Bson::RegularExpression(r) => regexes
                            .push(CompiledRegex::new(r.pattern.as_str(), r.options.as_str())?),
                        Bson::Document(sd) if is_operator_object(sd) => {
                            return Err(bad("cannot nest $ under $in"))
                        }
                        other => values.push(other.clone()),
                    }
                }
                let has_null = values.iter().any(|v| matches!(v, Bson::Null));
                values.sort_by(compare_values);
                values.dedup_by(|a, b| compare_values(a, b) == Ordering::Equal);
                let p = Pred::In {
                    values,
                    has_null,
                    regexes,
                };
                preds.push(if k == "$in" {
                    p
                } else {
                    Pred::Not(Box::new(p))
                });
            }
            "$exists" => preds.push(Pred::Exists(is_truthy(Some(v)))),
            "$type" => preds.push(Pred::Type(parse_types(v)?)),
            "$regex" => match v {
                Bson::String(s) => regex_src = Some((s.clone(), String::new())),
                Bson::RegularExpression(r) => {
                    regex_src = Some((r.pattern.to_string(), r.options.to_string()))
                }
                _ => return Err(bad("$regex has to be a string")),
            },
            "$options" => match v {
                Bson::String(s) => options = Some(s.clone()),
                _ => return Err(bad("$options has to be a string")),
            },
            "$size" => {
                let n = match v {
                    Bson::Int32(i) => *i as i64,
                    Bson::Int64(i) => *i,
                    Bson::Double(f) if f.fract() == 0.0 => *f as i64,
                    Bson::Double(_) => return Err(bad("$size must be a whole number")),
                    _ => return Err(bad("$size needs a number")),
                };
                if n < 0 {
                    return Err(bad("$size may not be negative"));
                }
                preds.push(Pred::Size(n));
            }
            "$all" => {
                let Bson::Array(arr) = v else {
                    return Err(bad("$all needs an array"));
                };
                let mut subs = Vec::with_capacity(arr.len());
                for e in arr {
                    match e {
                        Bson::RegularExpression(r) => subs.push(Pred::Regex(CompiledRegex::new(
                            r.pattern.as_str(),
                            r.options.as_str(),
                        )?)),
                        Bson::Document(sd) if sd.len() == 1 && sd.contains_key("$elemMatch") => {
                            subs.push(parse_operator_object(sd)?)
                        }
                        Bson::Document(sd) if is_operator_object(sd) => {
                            return Err(bad("no $ expressions in $all"))
                        }
                        other => subs.push(Pred::Eq(other.clone())),
                    }
                }
                preds.push(if subs.is_empty() {
                    Pred::Never
                } else {
                    Pred::All(subs)
                });
            }
            "$mod" => {
                let Bson::Array(arr) = v else {
                    return Err(bad("malformed mod, needs to be an array"));
                };
                if arr.len() < 2 {
                    return Err(bad("malformed mod, not enough elements"));
                }
                if arr.len() > 2 {
                    return Err(bad("malformed mod, too many elements"));
                }
                let to_i = |b: &Bson, what: &str| -> CommandResult<i64> {
                    match b {
                        Bson::Int32(i) => Ok(*i as i64),
                        Bson::Int64(i) => Ok(*i),
                        Bson::Double(f) if f.is_finite() => Ok(f.trunc() as i64),
                        Bson::Decimal128(_) => Ok(super::expr::num_to_f64(b).trunc() as i64),
                        _ => Err(bad(format!("malformed mod, {what} not a number"))),
                    }
                };
                let div = to_i(&arr[0], "divisor")?;
                let rem = to_i(&arr[1], "remainder")?;
                if div == 0 {
                    return Err(bad("divisor cannot be 0"));
                }
                preds.push(Pred::Mod(div, rem));
            }
            "$elemMatch" => {
                let Bson::Document(sd) = v else {
                    return Err(bad("$elemMatch needs an Object"));
                };
                let value_form = sd.keys().next().is_some_and(|k| {
                    k.starts_with('$')
                        && !matches!(k.as_str(), "$and" | "$or" | "$nor" | "$expr" | "$where")
                });
                if value_form {
                    let inner = parse_operator_object(sd)?;
                    preds.push(Pred::ElemMatchValue(match inner {
                        Pred::AndPreds(v) => v,
                        p => vec![p],
                    }));
                } else {
                    preds.push(Pred::ElemMatchObject(Box::new(parse_doc(sd, false)?)));
                }
            }
            "$not" => match v {
                Bson::RegularExpression(r) => preds.push(Pred::Not(Box::new(Pred::Regex(
                    CompiledRegex::new(r.pattern.as_str(), r.options.as_str())?,
                )))),
                Bson::Document(sd) => {
                    if sd.is_empty() {
                        return Err(bad("$not cannot be empty"));
                    }
                    if !is_operator_object(sd) {
                        return Err(bad("$not needs a regex or a document"));
                    }
                    preds.push(Pred::Not(Box::new(parse_operator_object(sd)?)));
                }
                _ => return Err(bad("$not needs a regex or a document")),
            },
            "$comment" => {}
            "$geoWithin" | "$geoIntersects" | "$near" | "$nearSphere" | "$bitsAllSet"
            | "$bitsAnySet" | "$bitsAllClear" | "$bitsAnyClear" => {
                return Err(bad(format!("{k} is not supported by mongo-sim")))
            }
            _ => return Err(bad(format!("unknown operator: {k}"))),
        }
    }
    if let Some(opts) = &options {
        let Some((_, ropts)) = &regex_src else {
            return Err(bad("$options needs a $regex"));
        };
        if !ropts.is_empty() {
            return Err(bad("options set in both $regex and $options"));
        }
        let _ = opts;
    }
    if let Some((pat, ropts)) = regex_src {
        let opts = options.unwrap_or(ropts);
        preds.push(Pred::Regex(CompiledRegex::new(&pat, &opts)?));
    }
    Ok(if preds.len() == 1 {
        preds.pop().expect("one")
    } else {
        Pred::AndPreds(preds)
    })
}

fn parse_types(v: &Bson) -> CommandResult<Vec<TypeSel>> {
    let one = |b: &Bson| -> CommandResult<TypeSel> {
        match b {
            Bson::String(s) => {
                let code = match s.as_str() {
                    "number" => return Ok(TypeSel::Number),
                    "double" => 1,
                    "string" => 2,
                    "object" => 3,
                    "array" => 4,
                    "binData" => 5,
                    "undefined" => 6,
                    "objectId" => 7,
                    "bool" => 8,
                    "date" => 9,
                    "null" => 10,
                    "regex" => 11,
                    "dbPointer" => 12,
                    "javascript" => 13,
                    "symbol" => 14,
                    "javascriptWithScope" => 15,
                    "int" => 16,
                    "timestamp" => 17,
                    "long" => 18,
                    "decimal" => 19,
                    "minKey" => -1,
                    "maxKey" => 127,
                    _ => return Err(bad(format!("Unknown type name alias: {s}"))),
                };
                Ok(TypeSel::Code(code))
            }
            Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => {
                let f = super::expr::num_to_f64(b);
                if f.fract() != 0.0 {
                    return Err(bad(format!("Invalid numerical type code: {f}")));
                }
                let c = f as i32;
                if !((1..=19).contains(&c) || c == -1 || c == 127) {
                    return Err(bad(format!("Invalid numerical type code: {c}")));
                }
                Ok(TypeSel::Code(c))
            }
            _ => Err(CommandError::type_mismatch(
                "type must be represented as a number or a string",
            )),
        }
    };
    match v {
        Bson::Array(a) => a.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

fn match_node(node: &Node, doc: &Document, vars: &Variables) -> CommandResult<bool> {
    Ok(match node {
        Node::And(children) => {
            for c in children {
                if !match_node(c, doc, vars)? {
                    return Ok(false);
                }
            }
            true
        }
        Node::Or(children) => {
            for c in children {
                if match_node(c, doc, vars)? {
                    return Ok(true);
                }
            }
            false
        }
        Node::Nor(children) => {
            for c in children {
                if match_node(c, doc, vars)? {
                    return Ok(false);
                }
            }
            true
        }
        Node::Const(b) => *b,
        Node::Expr(e) => is_truthy(evaluate_optional(e, doc, vars)?.as_ref()),
        Node::Path { path, pred } => {
            let vals = query_values(doc, path);
            pred_matches(pred, &vals, vars, true)?
        }
    })
}

/// Evaluates a predicate over the candidate values found at a path. With `expand`, leaf
/// arrays are also looked into (the normal query behaviour); `$elemMatch`'s value form
/// applies its predicates to single elements without expansion.
fn pred_matches(
    pred: &Pred,
    vals: &[Option<&Bson>],
    vars: &Variables,
    expand: bool,
) -> CommandResult<bool> {
    let any = |f: &dyn Fn(&Bson) -> bool| -> bool {
        vals.iter().any(|v| match v {
            Some(x) => f(x) || (expand && matches!(x, Bson::Array(a) if a.iter().any(f))),
            None => false,
        })
    };
    Ok(match pred {
        Pred::Eq(target) => {
            if matches!(target, Bson::Null) {
                vals.iter().any(|v| match v {
                    None => true,
                    Some(x) => {
                        is_nullish(x)
                            || (expand && matches!(x, Bson::Array(a) if a.iter().any(is_nullish)))
                    }
                })
            } else {
                any(&|x| eq_match(x, target))
            }
        }
        Pred::Cmp(op, target) => {
            let null_inclusive =
                matches!(target, Bson::Null) && matches!(op, CmpOp::Gte | CmpOp::Lte);
            if null_inclusive && vals.iter().any(|v| v.is_none()) {
                return Ok(true);
            }
            // $gte/$lte null are equality to null (which, in 7.0, includes undefined).
            any(&|x| cmp_match(*op, x, target) || (null_inclusive && is_nullish(x)))
        }
        Pred::In {
            values,
            has_null,
            regexes,
        } => {
            if *has_null && vals.iter().any(|v| v.is_none()) {
                return Ok(true);
            }
            any(&|x| {
                (*has_null && is_nullish(x))
                    || values.binary_search_by(|t| compare_values(t, x)).is_ok()
                    || regexes.iter().any(|r| r.matches_value(x))
            })
        }
        Pred::Exists(want) => vals.iter().any(|v| v.is_some()) == *want,
        Pred::Type(sels) => any(&|x| {
            sels.iter().any(|s| match s {
                TypeSel::Number => super::compare::is_number(x),
                TypeSel::Code(c) => type_number(x) == *c,
            })
        }),
        Pred::Regex(r) => any(&|x| r.matches_value(x)),
        Pred::Size(n) => vals
            .iter()
            .any(|v| matches!(v, Some(Bson::Array(a)) if a.len() as i64 == *n)),
        Pred::All(subs) => {
            for s in subs {
                if !pred_matches(s, vals, vars, expand)? {
                    return Ok(false);
                }
            }
            true
        }
        Pred::Mod(div, rem) => any(&|x| match x {
            Bson::Int32(i) => (*i as i64).wrapping_rem(*div) == *rem,
            Bson::Int64(i) => i.wrapping_rem(*div) == *rem,
            Bson::Double(_) | Bson::Decimal128(_) => {
                let f = super::expr::num_to_f64(x);
                f.is_finite() && (f.trunc() as i64).wrapping_rem(*div) == *rem
            }
            _ => false,
        }),
        Pred::ElemMatchValue(subs) => {
            for v in vals {
                if let Some(Bson::Array(a)) = v {
                    for e in a {
                        let single = [Some(e)];
                        let mut all = true;
                        for s in subs {
                            if !pred_matches(s, &single, vars, false)? {
                                all = false;
                                break;
                            }
                        }
                        if all {
                            return Ok(true);
                        }
                    }
                }
            }
            false
        }
        Pred::ElemMatchObject(node) => {
            for v in vals {
                if let Some(Bson::Array(a)) = v {
                    for e in a {
                        let matched = match e {
                            Bson::Document(d) => match_node(node, d, vars)?,
                            // Arrays are objects with keys "0", "1", ... to $elemMatch.
                            Bson::Array(inner) => {
                                let d: Document = inner
                                    .iter()
                                    .enumerate()
                                    .map(|(i, v)| (i.to_string(), v.clone()))
                                    .collect();
                                match_node(node, &d, vars)?
                            }
                            _ => false,
                        };
                        if matched {
                            return Ok(true);
                        }
                    }
                }
            }
            false
        }
        Pred::Not(inner) => !pred_matches(inner, vals, vars, expand)?,
        Pred::AndPreds(subs) => {
            for s in subs {
                if !pred_matches(s, vals, vars, expand)? {
                    return Ok(false);
                }
            }
            true
        }
        Pred::Never => false,
    })
}

fn is_nullish(x: &Bson) -> bool {
    // MongoDB 7.0: {a: null} still matches undefined (changed in 8.0).
    matches!(x, Bson::Null | Bson::Undefined)
}

fn eq_match(x: &Bson, target: &Bson) -> bool {
    canonical_type_rank(x) == canonical_type_rank(target)
        && compare_values(x, target) == Ordering::Equal
}

fn cmp_match(op: CmpOp, x: &Bson, target: &Bson) -> bool {
    let (rx, rt) = (canonical_type_rank(x), canonical_type_rank(target));
    if rx != rt {
        // Comparisons to MinKey/MaxKey cross type brackets.
        return match target {
            Bson::MaxKey => matches!(op, CmpOp::Lt | CmpOp::Lte),
            Bson::MinKey => matches!(op, CmpOp::Gt | CmpOp::Gte),
            _ => false,
        };
    }
    if is_nan(x) || is_nan(target) {
        let both = is_nan(x) && is_nan(target);
        return both && matches!(op, CmpOp::Lte | CmpOp::Gte);
    }
    let o = compare_values(x, target);
    match op {
        CmpOp::Lt => o == Ordering::Less,
        CmpOp::Lte => o != Ordering::Greater,
        CmpOp::Gt => o == Ordering::Greater,
        CmpOp::Gte => o != Ordering::Less,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Regex as BRegex};

    fn m(filter: Document, d: Document) -> bool {
        Matcher::new(&filter).unwrap().matches(&d)
    }

    fn re(p: &str, o: &str) -> Bson {
        Bson::RegularExpression(BRegex {
            pattern: p.to_string().try_into().unwrap(),
            options: o.to_string().try_into().unwrap(),
        })
    }

    #[test]
    fn implicit_equality_and_arrays() {
        assert!(m(doc! {"a": 1}, doc! {"a": 1.0}));
        assert!(m(doc! {"a": 1}, doc! {"a": [3, 1]}));
        assert!(m(doc! {"a": [3, 1]}, doc! {"a": [3, 1]}));
        assert!(!m(doc! {"a": [1, 3]}, doc! {"a": [3, 1]}));
        assert!(m(doc! {"a": [1]}, doc! {"a": [[1], 2]}));
        assert!(!m(doc! {"a": 1}, doc! {"a": [[1]]}));
        assert!(m(doc! {"a.b": 2}, doc! {"a": [{"b": 1}, {"b": 2}]}));
        assert!(m(doc! {"a.1": 5}, doc! {"a": [4, 5]}));
        assert!(m(doc! {"a.0": "f"}, doc! {"a": [{"0": "f"}]}));
        assert!(m(doc! {"a": {"b": 1}}, doc! {"a": {"b": 1}}));
        assert!(!m(doc! {"a": {"b": 1}}, doc! {"a": {"b": 1, "c": 2}}));
        assert!(!m(doc! {"a": "1"}, doc! {"a": 1}));
        assert!(m(doc! {}, doc! {"a": 1}));
    }

    #[test]
    fn null_and_missing() {
        assert!(m(doc! {"a": null}, doc! {"b": 1}));
        assert!(m(doc! {"a": null}, doc! {"a": null}));
        assert!(m(doc! {"a": null}, doc! {"a": Bson::Undefined}));
        assert!(!m(doc! {"a": null}, doc! {"a": 0}));
        assert!(!m(doc! {"a": null}, doc! {"a": []}));
        assert!(m(doc! {"a": null}, doc! {"a": [1, null]}));
        assert!(m(doc! {"a.b": null}, doc! {"a": [{"b": 1}, {"c": 1}]}));
        assert!(!m(doc! {"a.b": null}, doc! {"a": [{"b": 1}]}));
        assert!(m(doc! {"a.b": null}, doc! {"a": 5}));
        assert!(m(doc! {"a": {"$ne": null}}, doc! {"a": 0}));
        assert!(!m(doc! {"a": {"$ne": null}}, doc! {"b": 0}));
        assert!(m(doc! {"a": {"$gte": null}}, doc! {"b": 0}));
        assert!(m(doc! {"a": {"$lte": null}}, doc! {"a": Bson::Undefined}));
        assert!(!m(doc! {"a": {"$gt": null}}, doc! {"b": 0}));
        assert!(m(doc! {"a": {"$in": [null, 5]}}, doc! {}));
        assert!(!m(doc! {"a": {"$nin": [null]}}, doc! {}));
        assert!(m(doc! {"a": {"$exists": false}}, doc! {"b": 1}));
        assert!(!m(doc! {"a": {"$exists": false}}, doc! {"a": null}));
        assert!(m(doc! {"a": {"$exists": true}}, doc! {"a": null}));
        assert!(m(
            doc! {"a.b": {"$exists": true}},
            doc! {"a": [{"c": 1}, {"b": 1}]}
        ));
        assert!(!m(doc! {"a.b": {"$exists": true}}, doc! {"a": [1, 2]}));
    }

    /// The array cases of the server's `jstests/core/query/null_query_semantics.js` (7.0
    /// behaviour: undefined still matches null).
    #[test]
    fn dotted_null_semantics_over_arrays() {
        let docs = vec![
            ("a_double_array", doc! {"a": [[]]}),
            ("a_empty_array", doc! {"a": []}),
            (
                "a_object_array_b_mix",
                doc! {"a": [{"b": null}, {"b": Bson::Undefined}, {}]},
            ),
            (
                "a_object_array_no_b_nulls",
                doc! {"a": [{"b": 1}, {"b": 3}, {"b": "string"}]},
            ),
            (
                "a_object_array_some_b_nulls",
                doc! {"a": [{"b": null}, {"b": 3}]},
            ),
            ("a_object_array_some_b_missing", doc! {"a": [{"b": 3}, {}]}),
            ("a_value_array_all_nulls", doc! {"a": [null, null]}),
            ("a_value_array_no_nulls", doc! {"a": [1, "string", 4]}),
            ("a_number", doc! {"a": 4}),
            ("a_subobject_b_not_null", doc! {"a": {"b": "hi"}}),
            ("no_a", doc! {}),
        ];
        let run = |f: Document| -> Vec<&str> {
            let m = Matcher::new(&f).unwrap();
            docs.iter()
                .filter(|(_, d)| m.matches(d))
                .map(|(n, _)| *n)
                .collect()
        };
        let all_but = |excluded: &[&str]| -> Vec<&str> {
            docs.iter()
                .map(|(n, _)| *n)
                .filter(|n| !excluded.contains(n))
                .collect()
        };
        let not_null = ["a_object_array_no_b_nulls", "a_subobject_b_not_null"];
        assert_eq!(run(doc! {"a.b": {"$eq": null}}), all_but(&not_null));
        assert_eq!(run(doc! {"a.b": {"$ne": null}}), not_null.to_vec());
        assert_eq!(run(doc! {"a.b": {"$in": [null, 75]}}), all_but(&not_null));
        assert_eq!(run(doc! {"a.b": {"$nin": [null, 75]}}), not_null.to_vec());
        assert_eq!(
            run(doc! {"a": {"$elemMatch": {"b": {"$eq": null}}}}),
            vec![
                "a_double_array",
                "a_object_array_b_mix",
                "a_object_array_some_b_nulls",
                "a_object_array_some_b_missing"
            ]
        );
        assert_eq!(
            run(doc! {"a": {"$elemMatch": {"$eq": null}}}),
            vec!["a_value_array_all_nulls"]
        );
        assert!(run(doc! {"a.b": {"$elemMatch": {"$eq": null}}}).is_empty());
        assert_eq!(
            run(doc! {"a": {"$eq": null}}),
            vec!["a_value_array_all_nulls", "no_a"]
        );
    }

    #[test]
    fn comparison_type_bracketing() {
        assert!(m(doc! {"a": {"$gt": 5}}, doc! {"a": 6.5}));
        assert!(!m(doc! {"a": {"$gt": 5}}, doc! {"a": "x"}));
        assert!(!m(doc! {"a": {"$lt": "m"}}, doc! {"a": 1}));
        assert!(m(doc! {"a": {"$lt": "m"}}, doc! {"a": "abc"}));
        assert!(!m(doc! {"a": {"$gt": 5}}, doc! {"a": null}));
        assert!(m(doc! {"a": {"$gt": 5}}, doc! {"a": [1, 10]}));
        assert!(!m(doc! {"a": {"$gt": 5}}, doc! {"a": [1, 2]}));
        // Elements need not individually satisfy both bounds (no $elemMatch).
        assert!(m(doc! {"a": {"$gt": 5, "$lt": 3}}, doc! {"a": [1, 10]}));
        assert!(m(
            doc! {"a": {"$gte": bson::DateTime::from_millis(5)}},
            doc! {"a": bson::DateTime::from_millis(5)}
        ));
        assert!(!m(
            doc! {"a": {"$gte": bson::DateTime::from_millis(5)}},
            doc! {"a": 10}
        ));
        assert!(m(doc! {"a": {"$lt": Bson::MaxKey}}, doc! {"a": "x"}));
        assert!(m(doc! {"a": {"$gt": Bson::MinKey}}, doc! {"a": null}));
        assert!(!m(doc! {"a": {"$gt": f64::NAN}}, doc! {"a": 1}));
        assert!(m(doc! {"a": {"$gte": f64::NAN}}, doc! {"a": f64::NAN}));
        assert!(!m(doc! {"a": {"$lt": 0}}, doc! {"a": f64::NAN}));
        assert!(m(doc! {"a": {"$gt": [1]}}, doc! {"a": [2]}));
        assert!(m(doc! {"a": {"$lte": {"x": 2}}}, doc! {"a": {"x": 1}}));
        // $ne and $nin don't bracket.
        assert!(m(doc! {"a": {"$ne": 5}}, doc! {"a": "5"}));
        assert!(!m(doc! {"a": {"$ne": 1}}, doc! {"a": [1, 2]}));
        assert!(m(doc! {"a": {"$nin": [1, 3]}}, doc! {"a": [2, 4]}));
        assert!(!m(doc! {"a": {"$nin": [1, 3]}}, doc! {"a": [2, 3]}));
    }

    #[test]
    fn logical_operators() {
        let d = doc! {"a": 1, "b": 2};
        assert!(m(doc! {"$and": [{"a": 1}, {"b": 2}]}, d.clone()));
        assert!(!m(doc! {"$and": [{"a": 1}, {"b": 3}]}, d.clone()));
        assert!(m(doc! {"$or": [{"a": 5}, {"b": 2}]}, d.clone()));
        assert!(!m(doc! {"$nor": [{"a": 5}, {"b": 2}]}, d.clone()));
        assert!(m(doc! {"$nor": [{"a": 5}, {"b": 3}]}, d.clone()));
        assert!(m(doc! {"a": {"$not": {"$gt": 5}}}, d.clone()));
        assert!(m(doc! {"z": {"$not": {"$gt": 5}}}, d.clone()));
        assert!(!m(doc! {"a": {"$not": {"$lt": 5}}}, d.clone()));
        assert!(m(doc! {"s": {"$not": re("^x", "")}}, doc! {"s": "abc"}));
        assert!(m(doc! {"a": 1, "$comment": "hi"}, d.clone()));
        let e = Matcher::new(&doc! {"$and": []}).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (2, "$and/$or/$nor must be a nonempty array")
        );
        assert_eq!(Matcher::new(&doc! {"$or": [1]}).unwrap_err().code, 2);
        assert_eq!(Matcher::new(&doc! {"a": {"$not": 5}}).unwrap_err().code, 2);
    }

    #[test]
    fn unknown_operators() {
        let e = Matcher::new(&doc! {"a": {"$foo": 1}}).unwrap_err();
        assert_eq!(e.code, 2);
        assert_eq!(e.message, "unknown operator: $foo");
        let e = Matcher::new(&doc! {"$foo": 1}).unwrap_err();
        assert_eq!(e.code, 2);
        assert_eq!(e.message, "unknown top level operator: $foo");
        assert_eq!(Matcher::new(&doc! {"a": {"$in": 5}}).unwrap_err().code, 2);
    }

    #[test]
    fn in_and_regex() {
        assert!(m(doc! {"a": {"$in": [1, 2]}}, doc! {"a": 2.0}));
        assert!(m(doc! {"a": {"$in": [1, 2]}}, doc! {"a": [5, 2]}));
        assert!(!m(doc! {"a": {"$in": []}}, doc! {"a": 1}));
        assert!(m(doc! {"a": {"$in": [re("^ab", "")]}}, doc! {"a": "abc"}));
        assert!(m(doc! {"a": re("B", "i")}, doc! {"a": ["x", "abc"]}));
        assert!(!m(doc! {"a": re("B", "")}, doc! {"a": "abc"}));
        assert!(m(
            doc! {"a": {"$regex": "b", "$options": "i"}},
            doc! {"a": "ABC"}
        ));
        assert!(m(
            doc! {"a": {"$regex": re("^a.c$", "s")}},
            doc! {"a": "a\nc"}
        ));
        assert!(m(
            doc! {"a": {"$regex": "^x", "$options": "m"}},
            doc! {"a": "a\nx"}
        ));
        assert!(!m(doc! {"a": {"$regex": "^x"}}, doc! {"a": "a\nx"}));
        assert!(!m(doc! {"a": {"$regex": "1"}}, doc! {"a": 1}));
        // A stored regex equals the query regex.
        assert!(m(doc! {"a": re("x", "i")}, doc! {"a": re("x", "i")}));
        assert!(m(doc! {"a": {"$eq": re("x", "")}}, doc! {"a": re("x", "")}));
        assert!(!m(doc! {"a": {"$eq": re("x", "")}}, doc! {"a": "x"}));
        assert_eq!(
            Matcher::new(&doc! {"a": {"$options": "i"}})
                .unwrap_err()
                .code,
            2
        );
        assert_eq!(
            Matcher::new(&doc! {"a": {"$regex": "("}}).unwrap_err().code,
            51091
        );
    }

    #[test]
    fn type_operator() {
        assert!(m(doc! {"a": {"$type": "number"}}, doc! {"a": 1i64}));
        assert!(m(doc! {"a": {"$type": "string"}}, doc! {"a": "x"}));
        assert!(m(doc! {"a": {"$type": 2}}, doc! {"a": "x"}));
        assert!(m(doc! {"a": {"$type": "int"}}, doc! {"a": [1.5, 2]}));
        assert!(m(doc! {"a": {"$type": "array"}}, doc! {"a": []}));
        assert!(!m(doc! {"a": {"$type": "array"}}, doc! {"a": 1}));
        assert!(m(
            doc! {"a": {"$type": ["null", "double"]}},
            doc! {"a": null}
        ));
        assert!(!m(doc! {"a": {"$type": "null"}}, doc! {}));
        assert_eq!(
            Matcher::new(&doc! {"a": {"$type": "foo"}})
                .unwrap_err()
                .code,
            2
        );
        assert_eq!(
            Matcher::new(&doc! {"a": {"$type": 100}}).unwrap_err().code,
            2
        );
    }

    #[test]
    fn elem_match_size_all_mod() {
        let d = doc! {"a": [{"x": 1, "y": 2}, {"x": 3, "y": 4}], "n": [1, 5, 9]};
        assert!(m(doc! {"a": {"$elemMatch": {"x": 3, "y": 4}}}, d.clone()));
        assert!(!m(doc! {"a": {"$elemMatch": {"x": 1, "y": 4}}}, d.clone()));
        assert!(m(
            doc! {"n": {"$elemMatch": {"$gt": 4, "$lt": 6}}},
            d.clone()
        ));
        assert!(!m(
            doc! {"n": {"$elemMatch": {"$gt": 5, "$lt": 9}}},
            d.clone()
        ));
        assert!(m(
            doc! {"a": {"$elemMatch": {"$or": [{"x": 9}, {"y": 2}]}}},
            d.clone()
        ));
        assert!(!m(doc! {"n": {"$elemMatch": {"$gt": 0}}}, doc! {"n": 5}));
        assert!(m(doc! {"n": {"$size": 3}}, d.clone()));
        assert!(!m(doc! {"n": {"$size": 2}}, d.clone()));
        assert!(m(doc! {"n": {"$all": [9, 1]}}, d.clone()));
        assert!(!m(doc! {"n": {"$all": [9, 2]}}, d.clone()));
        assert!(!m(doc! {"n": {"$all": []}}, d.clone()));
        assert!(m(doc! {"n": {"$all": [5]}}, doc! {"n": 5}));
        assert!(m(
            doc! {"a": {"$all": [{"$elemMatch": {"x": 1}}, {"$elemMatch": {"y": 4}}]}},
            d.clone()
        ));
        assert!(m(doc! {"n": {"$mod": [4, 1]}}, d.clone()));
        assert!(m(doc! {"v": {"$mod": [4, 1]}}, doc! {"v": 5.7}));
        assert!(!m(doc! {"v": {"$mod": [4, 1]}}, doc! {"v": "5"}));
        assert_eq!(
            Matcher::new(&doc! {"v": {"$mod": [0, 1]}})
                .unwrap_err()
                .code,
            2
        );
        assert_eq!(
            Matcher::new(&doc! {"v": {"$mod": [1]}}).unwrap_err().code,
            2
        );
        assert_eq!(
            Matcher::new(&doc! {"v": {"$size": -1}}).unwrap_err().code,
            2
        );
    }

    #[test]
    fn expr_in_filters() {
        let d = doc! {"_id": 1, "a": 5, "b": 3};
        assert!(m(doc! {"$expr": {"$gt": ["$a", "$b"]}}, d.clone()));
        assert!(!m(doc! {"$expr": {"$lt": ["$a", "$b"]}}, d.clone()));
        assert!(m(
            doc! {"$expr": {"$eq": ["$$ROOT", {"_id": 1, "a": 5, "b": 3}]}},
            d.clone()
        ));
        assert!(!m(
            doc! {"$expr": {"$eq": ["$$ROOT", {"_id": 1, "b": 3, "a": 5}]}},
            d.clone()
        ));
        let mt = Matcher::new(&doc! {"$expr": {"$divide": [1, 0]}}).unwrap();
        assert!(!mt.matches(&d));
        assert_eq!(mt.try_matches(&d).unwrap_err().code, 16608);
    }

    #[test]
    fn id_equality_detection() {
        let mt = Matcher::new(&doc! {"_id": 5}).unwrap();
        assert_eq!(mt.id_equality(), Some(&Bson::Int32(5)));
        let mt = Matcher::new(&doc! {"_id": {"$eq": "x"}}).unwrap();
        assert_eq!(mt.id_equality(), Some(&Bson::String("x".into())));
        assert!(Matcher::new(&doc! {"_id": {"$gt": 1}})
            .unwrap()
            .id_equality()
            .is_none());
        assert!(Matcher::new(&doc! {"_id": 1, "a": 1})
            .unwrap()
            .id_equality()
            .is_none());
        assert!(Matcher::new(&doc! {"_id": {"a": 1}})
            .unwrap()
            .id_equality()
            .is_none());
        assert!(Matcher::new(&doc! {"_id": re("x", "")})
            .unwrap()
            .id_equality()
            .is_none());
    }

    #[test]
    fn large_in_lists_and_id_in_list() {
        let list: Vec<Bson> = (0..1000).rev().map(Bson::Int64).collect();
        let mut f = Document::new();
        let mut inner = Document::new();
        inner.insert("$in", list);
        f.insert("_id", inner);
        let mt = Matcher::new(&f).unwrap();
        assert!(mt.matches(&doc! {"_id": 500}));
        assert!(mt.matches(&doc! {"_id": 999.0}));
        assert!(!mt.matches(&doc! {"_id": 1000}));
        assert!(!mt.matches(&doc! {"_id": "500"}));
        let ids = mt.id_in_list().unwrap();
        assert_eq!(ids.len(), 1000);
        assert_eq!(ids[0], Bson::Int64(0));
        assert!(Matcher::new(&doc! {"_id": {"$in": [re("x", "")]}})
            .unwrap()
            .id_in_list()
            .is_none());
        assert!(Matcher::new(&doc! {"a": {"$in": [1]}})
            .unwrap()
            .id_in_list()
            .is_none());
        // null in the list matches null, undefined and missing.
        let mt = Matcher::new(&doc! {"a": {"$in": [null, 1]}}).unwrap();
        assert!(mt.matches(&doc! {"a": Bson::Undefined}));
        assert!(mt.matches(&doc! {"a": [2, null]}));
        assert!(!mt.matches(&doc! {"a": 2}));
    }

    #[test]
    fn value_conditions() {
        let vm = Matcher::value_condition(&doc! {"$gte": 6}).unwrap();
        assert!(vm.matches(&Bson::Int32(7)));
        assert!(!vm.matches(&Bson::Int32(5)));
        assert!(!vm.matches(&Bson::String("z".into())));
        let vm = Matcher::value_condition(&doc! {"$in": ["a", "b"]}).unwrap();
        assert!(vm.matches(&Bson::String("b".into())));
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn scalar() -> impl Strategy<Value = Bson> {
            prop_oneof![
                Just(Bson::Null),
                Just(Bson::Undefined),
                (-3i32..3).prop_map(Bson::Int32),
                (-3i64..3).prop_map(Bson::Int64),
                (-6i32..6).prop_map(|i| Bson::Double(i as f64 / 2.0)),
                Just(Bson::Double(f64::NAN)),
                "[ab]{0,2}".prop_map(Bson::String),
                any::<bool>().prop_map(Bson::Boolean),
            ]
        }

        fn value() -> impl Strategy<Value = Bson> {
            prop_oneof![
                3 => scalar(),
                1 => proptest::collection::vec(scalar(), 0..3).prop_map(Bson::Array),
                1 => scalar().prop_map(|v| Bson::Document(doc! {"b": v})),
            ]
        }

        fn doc_with(v: Option<Bson>) -> Document {
            let mut d = doc! {"_id": 1};
            if let Some(v) = v {
                d.insert("a", v);
            }
            d
        }

        fn eq_filter(v: &Bson) -> Document {
            doc! {"a": {"$eq": v.clone()}}
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn in_equals_or_of_equalities(
                field in proptest::option::of(value()),
                x in value(),
                y in value(),
            ) {
                let d = doc_with(field);
                let in_f = doc! {"a": {"$in": [x.clone(), y.clone()]}};
                let or_f = doc! {"$or": [eq_filter(&x), eq_filter(&y)]};
                let nin_f = doc! {"a": {"$nin": [x.clone(), y.clone()]}};
                let nor_f = doc! {"$nor": [eq_filter(&x), eq_filter(&y)]};
                let in_m = Matcher::new(&in_f).unwrap().matches(&d);
                prop_assert_eq!(in_m, Matcher::new(&or_f).unwrap().matches(&d));
                prop_assert_eq!(!in_m, Matcher::new(&nin_f).unwrap().matches(&d));
                prop_assert_eq!(!in_m, Matcher::new(&nor_f).unwrap().matches(&d));
                let ne = Matcher::new(&doc! {"a": {"$ne": x.clone()}}).unwrap().matches(&d);
                prop_assert_eq!(ne, !Matcher::new(&eq_filter(&x)).unwrap().matches(&d));
            }

            #[test]
            fn comparisons_partition_a_bracket(v in scalar(), x in scalar()) {
                let d = doc_with(Some(v.clone()));
                let lt = Matcher::new(&doc! {"a": {"$lt": x.clone()}}).unwrap().matches(&d);
                let gte = Matcher::new(&doc! {"a": {"$gte": x.clone()}}).unwrap().matches(&d);
                let same_bracket = canonical_type_rank(&v) == canonical_type_rank(&x);
                if same_bracket && !is_nan(&v) && !is_nan(&x) {
                    prop_assert!(lt != gte, "{:?} vs {:?}: lt={} gte={}", v, x, lt, gte);
                } else if !same_bracket {
                    let null_eq = matches!(x, Bson::Null) && matches!(v, Bson::Undefined);
                    prop_assert!(!lt && gte == null_eq);
                }
            }
        }
    }
}

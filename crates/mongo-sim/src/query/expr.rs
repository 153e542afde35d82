//! Aggregation expression evaluator (`$add`, `$cond`, field paths, `$$ROOT`, ...).
//!
//! Values are `Option<Bson>` internally: `None` is aggregation's "missing" (a missing field
//! path or `$$REMOVE`), which drops fields in `$project`/`$addFields` and compares below null.
//!
//! Decimal128 arithmetic is done through `f64` (comparison is exact, see `compare.rs`).

use std::cmp::Ordering;
use std::str::FromStr;

use bson::{Bson, Decimal128, Document};

use super::compare::{compare_optional, decode_decimal, is_number, type_name, DecimalValue};
use crate::error::{CommandError, CommandResult};

/// Error code for a malformed expression argument count.
const ARITY: i32 = 16020;
/// ConversionFailure.
const CONVERSION_FAILURE: i32 = 241;

/// Variables visible to an expression: system variables and user bindings (`$let`, `$map`).
#[derive(Debug, Clone)]
pub struct Variables {
    /// `$$NOW`.
    pub now: bson::DateTime,
    /// `$$CLUSTER_TIME`, when the caller knows it.
    pub cluster_time: Option<bson::Timestamp>,
    bindings: Vec<(String, Bson)>,
}

impl Default for Variables {
    fn default() -> Self {
        Variables::new(bson::DateTime::now())
    }
}

impl Variables {
    pub fn new(now: bson::DateTime) -> Self {
        Variables {
            now,
            cluster_time: None,
            bindings: Vec::new(),
        }
    }

    pub fn with_cluster_time(mut self, ts: bson::Timestamp) -> Self {
        self.cluster_time = Some(ts);
        self
    }

    /// A copy with one more user variable bound.
    pub fn bind(&self, name: &str, value: Bson) -> Variables {
        let mut v = self.clone();
        v.bindings.push((name.to_string(), value));
        v
    }

    /// Binds in place (the caller restores with [`Variables::unbind`]).
    pub fn push(&mut self, name: &str, value: Bson) {
        self.bindings.push((name.to_string(), value));
    }

    /// A copy with the command's `let` variables bound (outermost scope).
    pub fn with_lets(mut self, lets: &[(String, Bson)]) -> Variables {
        self.bindings.splice(0..0, lets.iter().cloned());
        self
    }

    /// Removes the most recent binding.
    pub fn unbind(&mut self) {
        self.bindings.pop();
    }

    /// The value of a user variable.
    pub fn get(&self, name: &str) -> Option<&Bson> {
        self.bindings
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }
}

/// Evaluates an expression; "missing" becomes `Null`.
pub fn evaluate(expr: &Bson, root: &Document, vars: &Variables) -> CommandResult<Bson> {
    Ok(evaluate_optional(expr, root, vars)?.unwrap_or(Bson::Null))
}

/// Evaluates an expression; `None` is "missing" (missing field path, `$$REMOVE`, ...).
pub fn evaluate_optional(
    expr: &Bson,
    root: &Document,
    vars: &Variables,
) -> CommandResult<Option<Bson>> {
    let mut ev = Evaluator {
        root,
        vars: vars.clone(),
    };
    ev.eval(expr)
}

/// MongoDB truthiness: false, null, undefined, missing and numeric zero are false.
pub fn is_truthy(v: Option<&Bson>) -> bool {
    match v {
        None | Some(Bson::Null) | Some(Bson::Undefined) | Some(Bson::Boolean(false)) => false,
        Some(Bson::Int32(i)) => *i != 0,
        Some(Bson::Int64(i)) => *i != 0,
        Some(Bson::Double(d)) => *d != 0.0,
        Some(Bson::Decimal128(d)) => !matches!(
            decode_decimal(d),
            DecimalValue::Finite { coefficient: 0, .. }
        ),
        Some(_) => true,
    }
}

/// Whether a value is null, undefined or missing.
fn nullish(v: &Option<Bson>) -> bool {
    matches!(v, None | Some(Bson::Null) | Some(Bson::Undefined))
}

fn type_of(v: &Option<Bson>) -> &'static str {
    match v {
        None => "missing",
        Some(b) => type_name(b),
    }
}

fn err(code: i32, msg: impl Into<String>) -> CommandError {
    CommandError::new(code, msg)
}

/// Aggregation field-path traversal: documents by name, arrays map over their elements
/// (non-document elements are dropped, numeric components are plain field names).
pub fn resolve_field_path(v: &Bson, parts: &[&str]) -> Option<Bson> {
    let Some((first, rest)) = parts.split_first() else {
        return Some(v.clone());
    };
    match v {
        Bson::Document(d) => d.get(*first).and_then(|x| resolve_field_path(x, rest)),
        Bson::Array(a) => Some(Bson::Array(
            a.iter()
                .filter_map(|e| match e {
                    Bson::Document(_) | Bson::Array(_) => resolve_field_path(e, parts),
                    _ => None,
                })
                .collect(),
        )),
        _ => None,
    }
}

/// Resolves `$a.b` (given without the `$`) against a document.
pub fn resolve_path_in_doc(doc: &Document, path: &str) -> Option<Bson> {
    let parts: Vec<&str> = path.split('.').collect();
    doc.get(parts[0])
        .and_then(|v| resolve_field_path(v, &parts[1..]))
}

struct Evaluator<'a> {
    root: &'a Document,
    vars: Variables,
}

impl Evaluator<'_> {
    fn eval(&mut self, expr: &Bson) -> CommandResult<Option<Bson>> {
        match expr {
            Bson::String(s) if s.starts_with("$$") => self.variable(&s[2..]),
            Bson::String(s) if s.starts_with('$') => {
                let path = &s[1..];
                if path.is_empty() {
                    return Err(err(16872, "'$' by itself is not a valid FieldPath"));
                }
                Ok(resolve_path_in_doc(self.root, path))
            }
            Bson::Document(d) => {
                if let Some((k, _)) = d.iter().next() {
                    if k.starts_with('$') {
                        if d.len() != 1 {
                            return Err(err(
                                15983,
                                format!(
                                    "an expression specification must contain exactly one field, the name of the expression. Found {} fields in {}",
                                    d.len(),
                                    d
                                ),
                            ));
                        }
                        let (op, arg) = d.iter().next().expect("one field");
                        return self.operator(op, arg);
                    }
                }
                let mut out = Document::new();
                for (k, v) in d {
                    if k.starts_with('$') {
                        return Err(err(
                            16410,
                            "FieldPath field names may not start with '$'. Consider using $getField or $setField.".to_string(),
                        ));
                    }
                    // FieldPath::uassertValidFieldName: an expression object's keys are field
                    // names, never paths.
                    if k.contains('.') {
                        return Err(err(
                            16412,
                            "FieldPath field names may not contain '.'. Consider using $getField or $setField.".to_string(),
                        ));
                    }
                    if let Some(val) = self.eval(v)? {
                        out.insert(k.clone(), val);
                    }
                }
                Ok(Some(Bson::Document(out)))
            }
            Bson::Array(a) => {
                let mut out = Vec::with_capacity(a.len());
                for e in a {
                    out.push(self.eval(e)?.unwrap_or(Bson::Null));
                }
                Ok(Some(Bson::Array(out)))
            }
            other => Ok(Some(other.clone())),
        }
    }

    fn variable(&mut self, spec: &str) -> CommandResult<Option<Bson>> {
        let mut parts = spec.split('.');
        let name = parts.next().unwrap_or("");
        let rest: Vec<&str> = parts.collect();
        let base: Bson = match name {
            "ROOT" | "CURRENT" => {
                if rest.is_empty() {
                    return Ok(Some(Bson::Document(self.root.clone())));
                }
                return Ok(self
                    .root
                    .get(rest[0])
                    .and_then(|v| resolve_field_path(v, &rest[1..])));
            }
            "REMOVE" => return Ok(None),
            "NOW" => Bson::DateTime(self.vars.now),
            "CLUSTER_TIME" => match self.vars.cluster_time {
                Some(ts) => Bson::Timestamp(ts),
                None => {
                    return Err(err(
                        10071200,
                        "$$CLUSTER_TIME is unavailable in this context",
                    ))
                }
            },
            _ => match self.vars.get(name) {
                Some(v) => v.clone(),
                None => return Err(err(17276, format!("Use of undefined variable: {name}"))),
            },
        };
        Ok(resolve_field_path(&base, &rest))
    }

    fn args<'b>(&self, arg: &'b Bson) -> Vec<&'b Bson> {
        match arg {
            Bson::Array(a) => a.iter().collect(),
            other => vec![other],
        }
    }

    fn eval_args(&mut self, arg: &Bson) -> CommandResult<Vec<Option<Bson>>> {
        let mut out = Vec::new();
        for a in self.args(arg) {
            out.push(self.eval(a)?);
        }
        Ok(out)
    }

    fn eval_n(&mut self, op: &str, arg: &Bson, n: usize) -> CommandResult<Vec<Option<Bson>>> {
        let args = self.args(arg);
        if args.len() != n {
            return Err(err(
                ARITY,
                format!(
                    "Expression {op} takes exactly {n} arguments. {} were passed in.",
                    args.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(n);
        for a in args {
            out.push(self.eval(a)?);
        }
        Ok(out)
    }

    fn operator(&mut self, op: &str, arg: &Bson) -> CommandResult<Option<Bson>> {
        match op {
            "$literal" => Ok(Some(arg.clone())),
            "$eq" | "$ne" | "$gt" | "$gte" | "$lt" | "$lte" | "$cmp" => {
                let v = self.eval_n(op, arg, 2)?;
                let o = compare_optional(v[0].as_ref(), v[1].as_ref());
                Ok(Some(match op {
                    "$eq" => Bson::Boolean(o == Ordering::Equal),
                    "$ne" => Bson::Boolean(o != Ordering::Equal),
                    "$gt" => Bson::Boolean(o == Ordering::Greater),
                    "$gte" => Bson::Boolean(o != Ordering::Less),
                    "$lt" => Bson::Boolean(o == Ordering::Less),
                    "$lte" => Bson::Boolean(o != Ordering::Greater),
                    _ => Bson::Int32(o as i32),
                }))
            }
            "$and" => {
                for a in self.args(arg) {
                    let v = self.eval(a)?;
                    if !is_truthy(v.as_ref()) {
                        return Ok(Some(Bson::Boolean(false)));
                    }
                }
                Ok(Some(Bson::Boolean(true)))
            }
            "$or" => {
                for a in self.args(arg) {
                    let v = self.eval(a)?;
                    if is_truthy(v.as_ref()) {
                        return Ok(Some(Bson::Boolean(true)));
                    }
                }
                Ok(Some(Bson::Boolean(false)))
            }
            "$not" => {
                let v = self.eval_n(op, arg, 1)?;
                Ok(Some(Bson::Boolean(!is_truthy(v[0].as_ref()))))
            }
            "$cond" => self.cond(arg),
            "$switch" => self.switch(arg),
            "$ifNull" => {
                let args = self.args(arg);
                if args.len() < 2 {
                    return Err(err(
                        1257300,
                        "$ifNull needs at least two arguments, had: ".to_string()
                            + &args.len().to_string(),
                    ));
                }
                let last = args.len() - 1;
                for a in &args[..last] {
                    let v = self.eval(a)?;
                    if !nullish(&v) {
                        return Ok(v);
                    }
                }
                self.eval(args[last])
            }
            "$in" => {
                let v = self.eval_n(op, arg, 2)?;
                match &v[1] {
                    Some(Bson::Array(a)) => {
                        let found = a
                            .iter()
                            .any(|e| compare_optional(v[0].as_ref(), Some(e)) == Ordering::Equal);
                        Ok(Some(Bson::Boolean(found)))
                    }
                    other => Err(err(
                        40081,
                        format!(
                            "$in requires an array as a second argument, found: {}",
                            type_of(other)
                        ),
                    )),
                }
            }
            "$add" => {
                let vals = self.eval_args(arg)?;
                let mut acc = Bson::Int32(0);
                let mut date: Option<i64> = None;
                for v in vals {
                    match v {
                        None | Some(Bson::Null) | Some(Bson::Undefined) => {
                            return Ok(Some(Bson::Null))
                        }
                        Some(Bson::DateTime(d)) => {
                            if date.is_some() {
                                return Err(err(
                                    16612,
                                    "only one date allowed in an $add expression",
                                ));
                            }
                            date = Some(d.timestamp_millis());
                        }
                        Some(n) if is_number(&n) => acc = num_add(&acc, &n),
                        Some(other) => {
                            return Err(err(
                                16554,
                                format!(
                                    "$add only supports numeric or date types, not {}",
                                    type_name(&other)
                                ),
                            ))
                        }
                    }
                }
                if let Some(ms) = date {
                    let add = num_to_f64(&acc);
                    let total = match acc {
                        Bson::Int32(i) => ms.wrapping_add(i as i64),
                        Bson::Int64(i) => ms.wrapping_add(i),
                        _ => (ms as f64 + add.round()) as i64,
                    };
                    return Ok(Some(Bson::DateTime(bson::DateTime::from_millis(total))));
                }
                Ok(Some(acc))
            }
            "$multiply" => {
                let vals = self.eval_args(arg)?;
                let mut acc = Bson::Int32(1);
                for v in vals {
                    match v {
                        None | Some(Bson::Null) | Some(Bson::Undefined) => {
                            return Ok(Some(Bson::Null))
                        }
                        Some(n) if is_number(&n) => acc = num_mul(&acc, &n),
                        Some(other) => {
                            return Err(err(
                                16555,
                                format!(
                                    "$multiply only supports numeric types, not {}",
                                    type_name(&other)
                                ),
                            ))
                        }
                    }
                }
                Ok(Some(acc))
            }
            "$subtract" => {
                let v = self.eval_n(op, arg, 2)?;
                if nullish(&v[0]) || nullish(&v[1]) {
                    return Ok(Some(Bson::Null));
                }
                let (a, b) = (
                    v[0].as_ref().expect("present"),
                    v[1].as_ref().expect("present"),
                );
                match (a, b) {
                    (Bson::DateTime(x), Bson::DateTime(y)) => Ok(Some(Bson::Int64(
                        x.timestamp_millis().wrapping_sub(y.timestamp_millis()),
                    ))),
                    (Bson::DateTime(x), n) if is_number(n) => {
                        let ms = match n {
                            Bson::Int32(i) => *i as i64,
                            Bson::Int64(i) => *i,
                            other => num_to_f64(other).round() as i64,
                        };
                        Ok(Some(Bson::DateTime(bson::DateTime::from_millis(
                            x.timestamp_millis().wrapping_sub(ms),
                        ))))
                    }
                    (x, y) if is_number(x) && is_number(y) => Ok(Some(num_sub(x, y))),
                    (x, y) => Err(err(
                        16556,
                        format!("cant $subtract a{} from a {}", type_name(y), type_name(x)),
                    )),
                }
            }
            "$divide" => {
                let v = self.eval_n(op, arg, 2)?;
                if nullish(&v[0]) || nullish(&v[1]) {
                    return Ok(Some(Bson::Null));
                }
                let (a, b) = (
                    v[0].as_ref().expect("present"),
                    v[1].as_ref().expect("present"),
                );
                if !is_number(a) || !is_number(b) {
                    return Err(err(
                        16609,
                        format!(
                            "$divide only supports numeric types, not {} and {}",
                            type_name(a),
                            type_name(b)
                        ),
                    ));
                }
                let d = num_to_f64(b);
                if d == 0.0 {
                    return Err(err(16608, "can't $divide by zero"));
                }
                let q = num_to_f64(a) / d;
                if matches!(a, Bson::Decimal128(_)) || matches!(b, Bson::Decimal128(_)) {
                    return Ok(Some(f64_to_decimal(q)));
                }
                Ok(Some(Bson::Double(q)))
            }
            "$mod" => {
                let v = self.eval_n(op, arg, 2)?;
                if nullish(&v[0]) || nullish(&v[1]) {
                    return Ok(Some(Bson::Null));
                }
                let (a, b) = (
                    v[0].as_ref().expect("present"),
                    v[1].as_ref().expect("present"),
                );
                if !is_number(a) || !is_number(b) {
                    return Err(err(
                        16611,
                        format!(
                            "$mod only supports numeric types, not {} and {}",
                            type_name(a),
                            type_name(b)
                        ),
                    ));
                }
                if num_to_f64(b) == 0.0 {
                    return Err(err(16610, "can't $mod by zero"));
                }
                Ok(Some(match (a, b) {
                    (Bson::Int32(x), Bson::Int32(y)) => Bson::Int32(x.wrapping_rem(*y)),
                    (Bson::Int32(_) | Bson::Int64(_), Bson::Int32(_) | Bson::Int64(_)) => {
                        Bson::Int64(as_i64(a).wrapping_rem(as_i64(b)))
                    }
                    (Bson::Decimal128(_), _) | (_, Bson::Decimal128(_)) => {
                        f64_to_decimal(num_to_f64(a) % num_to_f64(b))
                    }
                    _ => Bson::Double(num_to_f64(a) % num_to_f64(b)),
                }))
            }
            "$abs" => {
                let v = self.eval_n(op, arg, 1)?;
                match &v[0] {
                    None | Some(Bson::Null) | Some(Bson::Undefined) => Ok(Some(Bson::Null)),
                    Some(Bson::Int32(i)) => Ok(Some(match i.checked_abs() {
                        Some(x) => Bson::Int32(x),
                        None => Bson::Int64((*i as i64).abs()),
                    })),
                    Some(Bson::Int64(i)) => Ok(Some(match i.checked_abs() {
                        Some(x) => Bson::Int64(x),
                        None => Bson::Double((*i as f64).abs()),
                    })),
                    Some(Bson::Double(d)) => Ok(Some(Bson::Double(d.abs()))),
                    Some(Bson::Decimal128(d)) => {
                        let mut bytes = d.bytes();
                        bytes[15] &= 0x7f;
                        Ok(Some(Bson::Decimal128(Decimal128::from_bytes(bytes))))
                    }
                    other => Err(err(
                        28765,
                        format!("$abs only supports numeric types, not {}", type_of(other)),
                    )),
                }
            }
            "$concat" => {
                let vals = self.eval_args(arg)?;
                let mut s = String::new();
                for v in vals {
                    match v {
                        None | Some(Bson::Null) | Some(Bson::Undefined) => {
                            return Ok(Some(Bson::Null))
                        }
                        Some(Bson::String(x)) => s.push_str(&x),
                        other => {
                            return Err(err(
                                16702,
                                format!("$concat only supports strings, not {}", type_of(&other)),
                            ))
                        }
                    }
                }
                Ok(Some(Bson::String(s)))
            }
            "$toLower" | "$toUpper" => {
                let v = self.eval_n(op, arg, 1)?;
                let s = coerce_to_string(op, &v[0])?;
                Ok(Some(Bson::String(if op == "$toLower" {
                    s.to_ascii_lowercase()
                } else {
                    s.to_ascii_uppercase()
                })))
            }
            "$strLenBytes" => {
                let v = self.eval_n(op, arg, 1)?;
                match &v[0] {
                    Some(Bson::String(s)) => Ok(Some(Bson::Int32(s.len() as i32))),
                    other => Err(err(
                        34473,
                        format!(
                            "$strLenBytes requires a string argument, found: {}",
                            type_of(other)
                        ),
                    )),
                }
            }
            "$size" => {
                let v = self.eval_n(op, arg, 1)?;
                match &v[0] {
                    Some(Bson::Array(a)) => Ok(Some(Bson::Int32(a.len() as i32))),
                    other => Err(err(
                        17124,
                        format!(
                            "The argument to $size must be an array. Type of argument is: {}",
                            type_of(other)
                        ),
                    )),
                }
            }
            "$arrayElemAt" => {
                let v = self.eval_n(op, arg, 2)?;
                if nullish(&v[0]) || nullish(&v[1]) {
                    return Ok(Some(Bson::Null));
                }
                let Some(Bson::Array(a)) = &v[0] else {
                    return Err(err(
                        28689,
                        format!(
                            "$arrayElemAt's first argument must be an array, but is {}",
                            type_of(&v[0])
                        ),
                    ));
                };
                let idx = match &v[1] {
                    Some(n) if is_number(n) && is_integral(n) => as_i64(n),
                    other => {
                        return Err(err(
                            28690,
                            format!(
                                "$arrayElemAt's second argument must be a numeric value, but is {}",
                                type_of(other)
                            ),
                        ))
                    }
                };
                let i = if idx < 0 { a.len() as i64 + idx } else { idx };
                if i < 0 || i >= a.len() as i64 {
                    return Ok(None);
                }
                Ok(Some(a[i as usize].clone()))
            }
            "$first" | "$last" => {
                let v = self.eval_n(op, arg, 1)?;
                match &v[0] {
                    None | Some(Bson::Null) | Some(Bson::Undefined) => Ok(Some(Bson::Null)),
                    Some(Bson::Array(a)) => Ok(if op == "$first" {
                        a.first().cloned()
                    } else {
                        a.last().cloned()
                    }),
                    other => Err(err(
                        28689,
                        format!(
                            "{op}'s argument must be an array, but is {}",
                            type_of(other)
                        ),
                    )),
                }
            }
            "$concatArrays" => {
                let vals = self.eval_args(arg)?;
                let mut out = Vec::new();
                for v in vals {
                    match v {
                        None | Some(Bson::Null) | Some(Bson::Undefined) => {
                            return Ok(Some(Bson::Null))
                        }
                        Some(Bson::Array(a)) => out.extend(a),
                        other => {
                            return Err(err(
                                28664,
                                format!(
                                    "$concatArrays only supports arrays, not {}",
                                    type_of(&other)
                                ),
                            ))
                        }
                    }
                }
                Ok(Some(Bson::Array(out)))
            }
            "$isArray" => {
                let v = self.eval_n(op, arg, 1)?;
                Ok(Some(Bson::Boolean(matches!(v[0], Some(Bson::Array(_))))))
            }
            "$type" => {
                let v = self.eval_n(op, arg, 1)?;
                Ok(Some(Bson::String(type_of(&v[0]).to_string())))
            }
            "$toString" | "$toInt" | "$toLong" | "$toDouble" | "$toBool" | "$toDecimal" => {
                let v = self.eval_n(op, arg, 1)?;
                convert(op, v.into_iter().next().flatten())
            }
            "$getField" => self.get_field(arg),
            "$setField" => self.set_field(op, arg, false),
            "$unsetField" => self.set_field(op, arg, true),
            "$mergeObjects" => {
                let vals = self.eval_args(arg)?;
                let mut out = Document::new();
                for v in vals {
                    match v {
                        None | Some(Bson::Null) | Some(Bson::Undefined) => {}
                        Some(Bson::Document(d)) => {
                            for (k, val) in d {
                                out.insert(k, val);
                            }
                        }
                        Some(other) => {
                            return Err(err(
                                40400,
                                format!(
                                "$mergeObjects requires object inputs, but input {} is of type {}",
                                other,
                                type_name(&other)
                            ),
                            ))
                        }
                    }
                }
                Ok(Some(Bson::Document(out)))
            }
            "$objectToArray" => {
                let v = self.eval_n(op, arg, 1)?;
                match &v[0] {
                    None | Some(Bson::Null) | Some(Bson::Undefined) => Ok(Some(Bson::Null)),
                    Some(Bson::Document(d)) => Ok(Some(Bson::Array(
                        d.iter()
                            .map(|(k, v)| {
                                let mut e = Document::new();
                                e.insert("k", k.clone());
                                e.insert("v", v.clone());
                                Bson::Document(e)
                            })
                            .collect(),
                    ))),
                    other => Err(err(
                        40390,
                        format!(
                            "$objectToArray requires a document input, found: {}",
                            type_of(other)
                        ),
                    )),
                }
            }
            "$arrayToObject" => {
                let v = self.eval_n(op, arg, 1)?;
                match &v[0] {
                    None | Some(Bson::Null) | Some(Bson::Undefined) => Ok(Some(Bson::Null)),
                    Some(Bson::Array(a)) => array_to_object(a).map(|d| Some(Bson::Document(d))),
                    other => Err(err(
                        40386,
                        format!(
                            "$arrayToObject requires an array input, found: {}",
                            type_of(other)
                        ),
                    )),
                }
            }
            "$map" => self.map(arg),
            "$filter" => self.filter(arg),
            "$let" => self.let_(arg),
            "$sum" | "$avg" | "$max" | "$min" => {
                let args = self.args(arg);
                let vals: Vec<Option<Bson>> = if args.len() == 1 {
                    match self.eval(args[0])? {
                        Some(Bson::Array(a)) => a.into_iter().map(Some).collect(),
                        other => vec![other],
                    }
                } else {
                    let mut out = Vec::new();
                    for a in args {
                        out.push(self.eval(a)?);
                    }
                    out
                };
                Ok(Some(fold_accumulator(op, vals.iter().map(|v| v.as_ref()))))
            }
            _ => Err(err(168, format!("Unrecognized expression '{op}'"))),
        }
    }

    fn cond(&mut self, arg: &Bson) -> CommandResult<Option<Bson>> {
        let (i, t, e) = match arg {
            Bson::Array(a) => {
                if a.len() != 3 {
                    return Err(err(
                        ARITY,
                        format!(
                            "Expression $cond takes exactly 3 arguments. {} were passed in.",
                            a.len()
                        ),
                    ));
                }
                (&a[0], &a[1], &a[2])
            }
            Bson::Document(d) => {
                for k in d.keys() {
                    if !matches!(k.as_str(), "if" | "then" | "else") {
                        return Err(err(17083, format!("Unrecognized parameter to $cond: {k}")));
                    }
                }
                let get = |k: &str, code: i32| {
                    d.get(k)
                        .ok_or_else(|| err(code, format!("Missing '{k}' parameter to $cond")))
                };
                (get("if", 17080)?, get("then", 17081)?, get("else", 17082)?)
            }
            _ => {
                return Err(err(
                    ARITY,
                    "Expression $cond takes exactly 3 arguments. 1 were passed in.",
                ))
            }
        };
        let c = self.eval(i)?;
        if is_truthy(c.as_ref()) {
            self.eval(t)
        } else {
            self.eval(e)
        }
    }

    fn switch(&mut self, arg: &Bson) -> CommandResult<Option<Bson>> {
        let Bson::Document(d) = arg else {
            return Err(err(40060, "$switch requires an object as an argument"));
        };
        let Some(Bson::Array(branches)) = d.get("branches") else {
            return Err(err(40061, "$switch requires at least one branch."));
        };
        for b in branches {
            let Bson::Document(bd) = b else {
                return Err(err(40061, "$switch expected each branch to be an object"));
            };
            let (Some(case), Some(then)) = (bd.get("case"), bd.get("then")) else {
                return Err(err(
                    40064,
                    "$switch requires each branch have a 'case' and 'then'",
                ));
            };
            let c = self.eval(case)?;
            if is_truthy(c.as_ref()) {
                return self.eval(then);
            }
        }
        match d.get("default") {
            Some(def) => self.eval(def),
            None => Err(err(
                40066,
                "$switch could not find a matching branch for an input, and no default was specified.",
            )),
        }
    }

    fn get_field(&mut self, arg: &Bson) -> CommandResult<Option<Bson>> {
        let (field_expr, input) = match arg {
            Bson::Document(d) if d.contains_key("field") => {
                for k in d.keys() {
                    if k != "field" && k != "input" {
                        return Err(err(
                            3041701,
                            format!("$getField found an unknown argument: {k}"),
                        ));
                    }
                }
                let input = match d.get("input") {
                    Some(i) => self.eval(i)?,
                    None => Some(Bson::Document(self.root.clone())),
                };
                (d.get("field").expect("checked"), input)
            }
            other => (other, Some(Bson::Document(self.root.clone()))),
        };
        let field = match self.eval(field_expr)? {
            Some(Bson::String(s)) => s,
            other => {
                return Err(err(
                    3041704,
                    format!(
                        "$getField requires 'field' to evaluate to type String, but got {}",
                        type_of(&other)
                    ),
                ))
            }
        };
        match input {
            Some(Bson::Document(d)) => Ok(d.get(&field).cloned()),
            None => Ok(None),
            Some(Bson::Null) | Some(Bson::Undefined) => Ok(Some(Bson::Null)),
            Some(_) => Ok(None),
        }
    }

    fn set_field(&mut self, op: &str, arg: &Bson, unset: bool) -> CommandResult<Option<Bson>> {
        let Bson::Document(d) = arg else {
            return Err(err(
                4161100,
                format!("{op} only supports an object as its argument"),
            ));
        };
        for k in d.keys() {
            let ok = matches!(k.as_str(), "field" | "input") || (!unset && k == "value");
            if !ok {
                return Err(err(4161101, format!("{op} found an unknown argument: {k}")));
            }
        }
        let field = match d.get("field") {
            Some(Bson::String(s)) if s.starts_with('$') => {
                return Err(err(
                    4161108,
                    format!("{op}: a field path reference is not allowed for 'field'; use {{$literal: \"{s}\"}} for a field name starting with '$'"),
                ))
            }
            Some(Bson::String(s)) => s.clone(),
            Some(Bson::Document(fd)) if fd.len() == 1 && fd.contains_key("$literal") => {
                match fd.get("$literal") {
                    Some(Bson::String(s)) => s.clone(),
                    _ => {
                        return Err(err(
                            4161107,
                            format!("{op} requires 'field' to evaluate to a constant, but got a non-constant argument"),
                        ))
                    }
                }
            }
            _ => {
                return Err(err(
                    4161106,
                    format!("{op} requires 'field' to evaluate to type String"),
                ))
            }
        };
        let Some(input_expr) = d.get("input") else {
            return Err(err(
                4161102,
                format!("{op} requires 'input' to be specified"),
            ));
        };
        let value_expr =
            if unset {
                None
            } else {
                Some(d.get("value").ok_or_else(|| {
                    err(4161103, format!("{op} requires 'value' to be specified"))
                })?)
            };
        let input = self.eval(input_expr)?;
        let mut doc = match input {
            None | Some(Bson::Null) | Some(Bson::Undefined) => return Ok(Some(Bson::Null)),
            Some(Bson::Document(d)) => d,
            Some(other) => {
                return Err(err(
                    4161105,
                    format!(
                        "{op} requires 'input' to evaluate to type Object, but got {}",
                        type_name(&other)
                    ),
                ))
            }
        };
        let value = match value_expr {
            Some(v) => self.eval(v)?,
            None => None,
        };
        match value {
            Some(v) => {
                doc.insert(field, v);
            }
            None => {
                doc.remove(&field);
            }
        }
        Ok(Some(Bson::Document(doc)))
    }

    fn map(&mut self, arg: &Bson) -> CommandResult<Option<Bson>> {
        let Bson::Document(d) = arg else {
            return Err(err(16878, "$map only supports an object as its argument"));
        };
        let input_expr = d
            .get("input")
            .ok_or_else(|| err(16880, "Missing 'input' parameter to $map"))?;
        let in_expr = d
            .get("in")
            .ok_or_else(|| err(16882, "Missing 'in' parameter to $map"))?;
        let name = match d.get("as") {
            Some(Bson::String(s)) => s.clone(),
            None => "this".to_string(),
            Some(_) => return Err(err(16866, "'as' must be a string")),
        };
        let input = self.eval(input_expr)?;
        let arr = match input {
            None | Some(Bson::Null) | Some(Bson::Undefined) => return Ok(Some(Bson::Null)),
            Some(Bson::Array(a)) => a,
            other => {
                return Err(err(
                    16883,
                    format!("input to $map must be an array not {}", type_of(&other)),
                ))
            }
        };
        let mut out = Vec::with_capacity(arr.len());
        for e in arr {
            self.vars.push(&name, e);
            let r = self.eval(in_expr);
            self.vars.unbind();
            out.push(r?.unwrap_or(Bson::Null));
        }
        Ok(Some(Bson::Array(out)))
    }

    fn filter(&mut self, arg: &Bson) -> CommandResult<Option<Bson>> {
        let Bson::Document(d) = arg else {
            return Err(err(
                28646,
                "$filter only supports an object as its argument",
            ));
        };
        let input_expr = d
            .get("input")
            .ok_or_else(|| err(28648, "Missing 'input' parameter to $filter"))?;
        let cond = d
            .get("cond")
            .ok_or_else(|| err(28650, "Missing 'cond' parameter to $filter"))?;
        let name = match d.get("as") {
            Some(Bson::String(s)) => s.clone(),
            None => "this".to_string(),
            Some(_) => return Err(err(16866, "'as' must be a string")),
        };
        let limit =
            match d.get("limit") {
                None => None,
                Some(l) => match self.eval(l)? {
                    None | Some(Bson::Null) => None,
                    Some(n) if is_number(&n) && is_integral(&n) && as_i64(&n) >= 1 => {
                        Some(as_i64(&n) as usize)
                    }
                    Some(_) => return Err(err(
                        327391,
                        "$filter: limit must be represented as a positive 32-bit integral value",
                    )),
                },
            };
        let input = self.eval(input_expr)?;
        let arr = match input {
            None | Some(Bson::Null) | Some(Bson::Undefined) => return Ok(Some(Bson::Null)),
            Some(Bson::Array(a)) => a,
            other => {
                return Err(err(
                    28651,
                    format!("input to $filter must be an array not {}", type_of(&other)),
                ))
            }
        };
        let mut out = Vec::new();
        for e in arr {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            self.vars.push(&name, e.clone());
            let r = self.eval(cond);
            self.vars.unbind();
            if is_truthy(r?.as_ref()) {
                out.push(e);
            }
        }
        Ok(Some(Bson::Array(out)))
    }

    fn let_(&mut self, arg: &Bson) -> CommandResult<Option<Bson>> {
        let Bson::Document(d) = arg else {
            return Err(err(16874, "$let only supports an object as its argument"));
        };
        let Some(Bson::Document(vars)) = d.get("vars") else {
            return Err(err(16876, "Missing 'vars' parameter to $let"));
        };
        let in_expr = d
            .get("in")
            .ok_or_else(|| err(16877, "Missing 'in' parameter to $let"))?;
        let mut values = Vec::with_capacity(vars.len());
        for (k, v) in vars {
            values.push((k.clone(), self.eval(v)?.unwrap_or(Bson::Null)));
        }
        let n = values.len();
        for (k, v) in values {
            self.vars.push(&k, v);
        }
        let r = self.eval(in_expr);
        for _ in 0..n {
            self.vars.unbind();
        }
        r
    }
}

fn array_to_object(a: &[Bson]) -> CommandResult<Document> {
    let mut out = Document::new();
    for e in a {
        match e {
            Bson::Array(pair) => {
                if pair.len() != 2 {
                    return Err(err(
                        40397,
                        "$arrayToObject requires an array of size 2 arrays",
                    ));
                }
                let Bson::String(k) = &pair[0] else {
                    return Err(err(
                        40395,
                        format!(
                            "$arrayToObject requires an array of key-value pairs, where the key must be of type string. Found key type: {}",
                            type_name(&pair[0])
                        ),
                    ));
                };
                out.insert(k.clone(), pair[1].clone());
            }
            Bson::Document(kv) => {
                let (Some(Bson::String(k)), Some(v), 2) = (kv.get("k"), kv.get("v"), kv.len())
                else {
                    return Err(err(
                        40392,
                        "$arrayToObject requires an object keys of 'k' and 'v'",
                    ));
                };
                out.insert(k.clone(), v.clone());
            }
            other => {
                return Err(err(
                    40398,
                    format!(
                        "Unrecognised input type format for $arrayToObject: {}",
                        type_name(other)
                    ),
                ))
            }
        }
    }
    Ok(out)
}

fn coerce_to_string(op: &str, v: &Option<Bson>) -> CommandResult<String> {
    Ok(match v {
        None | Some(Bson::Null) | Some(Bson::Undefined) => String::new(),
        Some(Bson::String(s)) | Some(Bson::Symbol(s)) => s.clone(),
        Some(Bson::Int32(i)) => i.to_string(),
        Some(Bson::Int64(i)) => i.to_string(),
        Some(Bson::Double(d)) => format_double(*d),
        Some(Bson::Decimal128(d)) => d.to_string(),
        Some(Bson::DateTime(d)) => format_date(d),
        Some(Bson::Timestamp(t)) => format!("Timestamp({}, {})", t.time, t.increment),
        Some(other) => {
            return Err(err(
                16007,
                format!(
                    "{op}: can't convert from BSON type {} to String",
                    type_name(other)
                ),
            ))
        }
    })
}

/// Formats a date the way `$toString` does: `2020-01-02T03:04:05.678Z`.
pub fn format_date(d: &bson::DateTime) -> String {
    d.try_to_rfc3339_string()
        .map(|s| {
            // bson renders whole seconds without millis; the server always prints millis.
            if s.len() == 20 {
                format!("{}.000Z", &s[..19])
            } else {
                s
            }
        })
        .unwrap_or_else(|_| d.timestamp_millis().to_string())
}

fn format_double(d: f64) -> String {
    if d.is_nan() {
        "NaN".into()
    } else if d.is_infinite() {
        if d > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        format!("{d}")
    }
}

fn conversion_error(from: &str, to: &str) -> CommandError {
    err(
        CONVERSION_FAILURE,
        format!("Unsupported conversion from {from} to {to} in $convert with no onError value"),
    )
}

fn convert(op: &str, v: Option<Bson>) -> CommandResult<Option<Bson>> {
    let v = match v {
        None | Some(Bson::Null) | Some(Bson::Undefined) => return Ok(Some(Bson::Null)),
        Some(v) => v,
    };
    let from = type_name(&v);
    match op {
        "$toString" => Ok(Some(Bson::String(match &v {
            Bson::Boolean(b) => b.to_string(),
            Bson::ObjectId(o) => o.to_hex(),
            Bson::String(_)
            | Bson::Int32(_)
            | Bson::Int64(_)
            | Bson::Double(_)
            | Bson::Decimal128(_)
            | Bson::DateTime(_) => coerce_to_string(op, &Some(v.clone()))?,
            _ => return Err(conversion_error(from, "string")),
        }))),
        "$toBool" => Ok(Some(Bson::Boolean(match &v {
            Bson::Boolean(b) => *b,
            n if is_number(n) => is_truthy(Some(n)),
            _ => true,
        }))),
        "$toDouble" => Ok(Some(Bson::Double(match &v {
            Bson::Boolean(b) => *b as i32 as f64,
            Bson::DateTime(d) => d.timestamp_millis() as f64,
            Bson::String(s) => parse_number_string(s)?,
            n if is_number(n) => num_to_f64(n),
            _ => return Err(conversion_error(from, "double")),
        }))),
        "$toDecimal" => Ok(Some(match &v {
            Bson::Decimal128(_) => v.clone(),
            Bson::Int32(i) => dec_from_str(&i.to_string()),
            Bson::Int64(i) => dec_from_str(&i.to_string()),
            Bson::Boolean(b) => dec_from_str(if *b { "1" } else { "0" }),
            Bson::Double(d) => f64_to_decimal(*d),
            Bson::String(s) => match Decimal128::from_str(s) {
                Ok(d) => Bson::Decimal128(d),
                Err(_) => {
                    return Err(err(
                        CONVERSION_FAILURE,
                        format!("Failed to parse number '{s}' in $convert with no onError value"),
                    ))
                }
            },
            Bson::DateTime(d) => dec_from_str(&d.timestamp_millis().to_string()),
            _ => return Err(conversion_error(from, "decimal")),
        })),
        "$toInt" | "$toLong" => {
            let to = if op == "$toInt" { "int" } else { "long" };
            let (lo, hi) = if op == "$toInt" {
                (i32::MIN as f64, i32::MAX as f64)
            } else {
                (i64::MIN as f64, 9_223_372_036_854_775_807f64)
            };
            let n: i64 = match &v {
                Bson::Boolean(b) => *b as i64,
                Bson::Int32(i) => *i as i64,
                Bson::Int64(i) => *i,
                Bson::DateTime(d) if op == "$toLong" => d.timestamp_millis(),
                Bson::Double(_) | Bson::Decimal128(_) => {
                    let f = num_to_f64(&v);
                    if f.is_nan() {
                        return Err(err(
                            CONVERSION_FAILURE,
                            "Attempt to convert NaN value to integer type in $convert with no onError value".to_string(),
                        ));
                    }
                    let t = f.trunc();
                    if t < lo || t >= hi + 1.0 || f.is_infinite() {
                        return Err(err(
                            CONVERSION_FAILURE,
                            format!("Conversion would overflow target type in $convert with no onError value: {}", format_double(f)),
                        ));
                    }
                    t as i64
                }
                Bson::String(s) => match s.parse::<i64>() {
                    Ok(n) => n,
                    Err(_) => {
                        return Err(err(
                            CONVERSION_FAILURE,
                            format!("Failed to parse number '{s}' in $convert with no onError value: Did not consume whole string."),
                        ))
                    }
                },
                _ => return Err(conversion_error(from, to)),
            };
            if op == "$toInt" {
                match i32::try_from(n) {
                    Ok(i) => Ok(Some(Bson::Int32(i))),
                    Err(_) => Err(err(
                        CONVERSION_FAILURE,
                        format!("Conversion would overflow target type in $convert with no onError value: {n}"),
                    )),
                }
            } else {
                Ok(Some(Bson::Int64(n)))
            }
        }
        _ => unreachable!("caller passes conversion operators only"),
    }
}

fn parse_number_string(s: &str) -> CommandResult<f64> {
    let t = s.trim();
    if t.is_empty() || t != s {
        return Err(err(
            CONVERSION_FAILURE,
            format!("Failed to parse number '{s}' in $convert with no onError value"),
        ));
    }
    match t {
        "NaN" | "nan" => Ok(f64::NAN),
        "Infinity" | "inf" | "infinity" => Ok(f64::INFINITY),
        "-Infinity" | "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
        _ => t.parse::<f64>().map_err(|_| {
            err(
                CONVERSION_FAILURE,
                format!("Failed to parse number '{s}' in $convert with no onError value"),
            )
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Numeric helpers (shared with update and aggregate)
// ---------------------------------------------------------------------------------------------

/// Converts any numeric value to f64 (lossy for large Int64 and Decimal128).
pub fn num_to_f64(b: &Bson) -> f64 {
    match b {
        Bson::Int32(i) => *i as f64,
        Bson::Int64(i) => *i as f64,
        Bson::Double(d) => *d,
        Bson::Decimal128(d) => match decode_decimal(d) {
            DecimalValue::NaN => f64::NAN,
            DecimalValue::Inf { negative } => {
                if negative {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                }
            }
            DecimalValue::Finite { .. } => d.to_string().parse::<f64>().unwrap_or(f64::NAN),
        },
        _ => f64::NAN,
    }
}

fn as_i64(b: &Bson) -> i64 {
    match b {
        Bson::Int32(i) => *i as i64,
        Bson::Int64(i) => *i,
        other => num_to_f64(other) as i64,
    }
}

fn is_integral(b: &Bson) -> bool {
    match b {
        Bson::Int32(_) | Bson::Int64(_) => true,
        other => {
            let f = num_to_f64(other);
            f.is_finite() && f.fract() == 0.0
        }
    }
}

fn dec_from_str(s: &str) -> Bson {
    Bson::Decimal128(Decimal128::from_str(s).expect("valid decimal literal"))
}

/// Converts an f64 to a Decimal128 (through its shortest decimal representation).
pub fn f64_to_decimal(f: f64) -> Bson {
    let s = if f.is_nan() {
        "NaN".to_string()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        format!("{f:e}")
    };
    Bson::Decimal128(
        Decimal128::from_str(&s)
            .unwrap_or_else(|_| Decimal128::from_str("NaN").expect("NaN parses")),
    )
}

const DEC_MAX_COEF: u128 = 9_999_999_999_999_999_999_999_999_999_999;

/// A finite numeric value as an exact decimal `(negative, coefficient, exponent)`. Doubles
/// go through their shortest decimal representation, as the server converts them to
/// Decimal128 before mixed arithmetic.
fn dec_parts(b: &Bson) -> Option<(bool, u128, i32)> {
    match b {
        Bson::Int32(i) => Some((*i < 0, (*i as i64).unsigned_abs() as u128, 0)),
        Bson::Int64(i) => Some((*i < 0, i.unsigned_abs() as u128, 0)),
        Bson::Double(d) if d.is_finite() => match f64_to_decimal(*d) {
            Bson::Decimal128(x) => dec_parts(&Bson::Decimal128(x)),
            _ => None,
        },
        Bson::Decimal128(d) => match decode_decimal(d) {
            DecimalValue::Finite {
                negative,
                coefficient,
                exponent,
            } => Some((negative, coefficient, exponent)),
            _ => None,
        },
        _ => None,
    }
}

/// Encodes an exact decimal, or `None` when it does not fit without rounding.
fn dec_encode(negative: bool, mut coef: u128, mut exp: i32) -> Option<Bson> {
    while coef > DEC_MAX_COEF {
        if !coef.is_multiple_of(10) {
            return None;
        }
        coef /= 10;
        exp += 1;
    }
    if !(-6176..=6111).contains(&exp) {
        return None;
    }
    let bits = ((negative as u128) << 127) | (((exp + 6176) as u128) << 113) | coef;
    Some(Bson::Decimal128(Decimal128::from_bytes(bits.to_le_bytes())))
}

fn pow10(n: u32) -> Option<u128> {
    10u128.checked_pow(n)
}

/// Exact Decimal128 addition/subtraction when the result needs no rounding.
fn dec_add(a: &Bson, b: &Bson, subtract: bool) -> Option<Bson> {
    let (na, ca, ea) = dec_parts(a)?;
    let (nb, cb, eb) = dec_parts(b)?;
    let nb = nb ^ subtract;
    let e = ea.min(eb);
    let ca = ca.checked_mul(pow10((ea - e) as u32)?)?;
    let cb = cb.checked_mul(pow10((eb - e) as u32)?)?;
    let (neg, coef) = if na == nb {
        (na, ca.checked_add(cb)?)
    } else if ca >= cb {
        (na, ca - cb)
    } else {
        (nb, cb - ca)
    };
    dec_encode(neg && coef != 0, coef, e)
}

/// Exact Decimal128 multiplication when the result needs no rounding.
fn dec_mul(a: &Bson, b: &Bson) -> Option<Bson> {
    let (na, ca, ea) = dec_parts(a)?;
    let (nb, cb, eb) = dec_parts(b)?;
    let coef = ca.checked_mul(cb)?;
    dec_encode((na ^ nb) && coef != 0, coef, ea + eb)
}

/// Which numeric "width" wins when combining two values.
fn num_class(b: &Bson) -> u8 {
    match b {
        Bson::Int32(_) => 0,
        Bson::Int64(_) => 1,
        Bson::Double(_) => 2,
        _ => 3,
    }
}

/// Server-style addition: Int32 overflow widens to Int64, Int64 overflow to Double; a Double
/// makes the result Double; a Decimal128 makes it Decimal128.
pub fn num_add(a: &Bson, b: &Bson) -> Bson {
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => match x.checked_add(*y) {
            Some(s) => Bson::Int32(s),
            None => Bson::Int64(*x as i64 + *y as i64),
        },
        _ => match num_class(a).max(num_class(b)) {
            1 => match as_i64(a).checked_add(as_i64(b)) {
                Some(s) => Bson::Int64(s),
                None => Bson::Double(as_i64(a) as f64 + as_i64(b) as f64),
            },
            2 => Bson::Double(num_to_f64(a) + num_to_f64(b)),
            _ => dec_add(a, b, false)
                .unwrap_or_else(|| f64_to_decimal(num_to_f64(a) + num_to_f64(b))),
        },
    }
}

/// Server-style subtraction (same widening rules as [`num_add`]).
pub fn num_sub(a: &Bson, b: &Bson) -> Bson {
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => match x.checked_sub(*y) {
            Some(s) => Bson::Int32(s),
            None => Bson::Int64(*x as i64 - *y as i64),
        },
        _ => match num_class(a).max(num_class(b)) {
            1 => match as_i64(a).checked_sub(as_i64(b)) {
                Some(s) => Bson::Int64(s),
                None => Bson::Double(as_i64(a) as f64 - as_i64(b) as f64),
            },
            2 => Bson::Double(num_to_f64(a) - num_to_f64(b)),
            _ => {
                dec_add(a, b, true).unwrap_or_else(|| f64_to_decimal(num_to_f64(a) - num_to_f64(b)))
            }
        },
    }
}

/// Server-style multiplication (same widening rules as [`num_add`]).
pub fn num_mul(a: &Bson, b: &Bson) -> Bson {
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => match x.checked_mul(*y) {
            Some(s) => Bson::Int32(s),
            None => Bson::Int64(*x as i64 * *y as i64),
        },
        _ => match num_class(a).max(num_class(b)) {
            1 => match as_i64(a).checked_mul(as_i64(b)) {
                Some(s) => Bson::Int64(s),
                None => Bson::Double(as_i64(a) as f64 * as_i64(b) as f64),
            },
            2 => Bson::Double(num_to_f64(a) * num_to_f64(b)),
            _ => dec_mul(a, b).unwrap_or_else(|| f64_to_decimal(num_to_f64(a) * num_to_f64(b))),
        },
    }
}

/// `$sum`/`$avg`/`$max`/`$min` over a list of values (expression and accumulator forms).
pub fn fold_accumulator<'a>(op: &str, vals: impl Iterator<Item = Option<&'a Bson>>) -> Bson {
    match op {
        "$sum" | "$avg" => {
            let mut acc = Bson::Int32(0);
            let mut n = 0usize;
            for v in vals.flatten() {
                if is_number(v) {
                    acc = num_add(&acc, v);
                    n += 1;
                }
            }
            if op == "$sum" {
                acc
            } else if n == 0 {
                Bson::Null
            } else if matches!(acc, Bson::Decimal128(_)) {
                f64_to_decimal(num_to_f64(&acc) / n as f64)
            } else {
                Bson::Double(num_to_f64(&acc) / n as f64)
            }
        }
        _ => {
            let want = if op == "$max" {
                Ordering::Greater
            } else {
                Ordering::Less
            };
            let mut best: Option<&Bson> = None;
            for v in vals.flatten() {
                if matches!(v, Bson::Null | Bson::Undefined) {
                    continue;
                }
                best = match best {
                    None => Some(v),
                    Some(b) if super::compare::compare_values(v, b) == want => Some(v),
                    keep => keep,
                };
            }
            best.cloned().unwrap_or(Bson::Null)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn ev(expr: Bson, root: &Document) -> CommandResult<Option<Bson>> {
        evaluate_optional(
            &expr,
            root,
            &Variables::new(bson::DateTime::from_millis(1000)),
        )
    }

    fn ok(expr: Bson, root: &Document) -> Bson {
        ev(expr, root)
            .unwrap()
            .unwrap_or(Bson::String("<missing>".into()))
    }

    #[test]
    fn field_paths_and_variables() {
        let d = doc! {"a": {"b": 1}, "arr": [{"x": 1}, {"y": 2}, {"x": 3}, 5, [{"x": 4}]]};
        assert_eq!(ok(Bson::String("$a.b".into()), &d), Bson::Int32(1));
        assert_eq!(ev(Bson::String("$nope".into()), &d).unwrap(), None);
        assert_eq!(
            ok(Bson::String("$arr.x".into()), &d),
            Bson::Array(vec![
                Bson::Int32(1),
                Bson::Int32(3),
                Bson::Array(vec![Bson::Int32(4)])
            ])
        );
        assert_eq!(
            ok(Bson::String("$$ROOT".into()), &d),
            Bson::Document(d.clone())
        );
        assert_eq!(ok(Bson::String("$$CURRENT.a.b".into()), &d), Bson::Int32(1));
        assert_eq!(ev(Bson::String("$$REMOVE".into()), &d).unwrap(), None);
        assert_eq!(
            ok(Bson::String("$$NOW".into()), &d),
            Bson::DateTime(bson::DateTime::from_millis(1000))
        );
        assert_eq!(
            ev(Bson::String("$$nope".into()), &d).unwrap_err().code,
            17276
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$let": {"vars": {"v": "$a.b"}, "in": {"$add": ["$$v", 10]}}}),
                &d
            ),
            Bson::Int32(11)
        );
        // Object expressions drop missing fields.
        assert_eq!(
            ok(
                Bson::Document(doc! {"p": "$a.b", "q": "$zz", "r": [ "$zz" ]}),
                &d
            ),
            Bson::Document(doc! {"p": 1, "r": [null]})
        );
    }

    #[test]
    fn comparison_uses_full_type_order() {
        let d = doc! {"_id": 1, "a": 1, "b": 2};
        assert_eq!(
            ok(
                Bson::Document(doc! {"$eq": ["$$ROOT", {"_id": 1, "a": 1, "b": 2}]}),
                &d
            ),
            Bson::Boolean(true)
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$eq": ["$$ROOT", {"_id": 1, "b": 2, "a": 1}]}),
                &d
            ),
            Bson::Boolean(false)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$eq": ["$a", 1.0]}), &d),
            Bson::Boolean(true)
        );
        // missing < null, and not equal.
        assert_eq!(
            ok(Bson::Document(doc! {"$eq": ["$zz", null]}), &d),
            Bson::Boolean(false)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$lt": ["$zz", null]}), &d),
            Bson::Boolean(true)
        );
        // No type bracketing: strings are greater than numbers.
        assert_eq!(
            ok(Bson::Document(doc! {"$gt": ["x", 5]}), &d),
            Bson::Boolean(true)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$cmp": [1, 2]}), &d),
            Bson::Int32(-1)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$ne": ["$a", 2]}), &d),
            Bson::Boolean(true)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$gte": ["$b", 2]}), &d),
            Bson::Boolean(true)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$lte": ["$b", 1]}), &d),
            Bson::Boolean(false)
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$eq": [1]}), &d).unwrap_err().code,
            16020
        );
    }

    #[test]
    fn logic_and_conditionals() {
        let d = doc! {"a": 0, "b": "x", "n": null};
        assert_eq!(
            ok(Bson::Document(doc! {"$and": ["$b", 1]}), &d),
            Bson::Boolean(true)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$and": ["$b", "$a"]}), &d),
            Bson::Boolean(false)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$or": ["$a", "$n", "$zz"]}), &d),
            Bson::Boolean(false)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$not": ["$a"]}), &d),
            Bson::Boolean(true)
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$cond": [{"$eq": ["$b", "x"]}, "yes", "no"]}),
                &d
            ),
            Bson::String("yes".into())
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$cond": {"if": "$a", "then": "yes", "else": "no"}}),
                &d
            ),
            Bson::String("no".into())
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$ifNull": ["$n", "$zz", "fallback"]}),
                &d
            ),
            Bson::String("fallback".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$ifNull": ["$a", 1]}), &d),
            Bson::Int32(0)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$in": ["$b", ["y", "x"]]}), &d),
            Bson::Boolean(true)
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$in": ["$b", "$zz"]}), &d)
                .unwrap_err()
                .code,
            40081
        );
        assert_eq!(
            ok(
                Bson::Document(
                    doc! {"$switch": {"branches": [{"case": "$a", "then": 1}, {"case": "$b", "then": 2}], "default": 3}}
                ),
                &d
            ),
            Bson::Int32(2)
        );
    }

    #[test]
    fn arithmetic_promotions() {
        let d = doc! {"i": 2_000_000_000, "l": i64::MAX, "f": 1.5, "s": "x", "dt": bson::DateTime::from_millis(1000)};
        assert_eq!(
            ok(Bson::Document(doc! {"$add": [1, 2]}), &d),
            Bson::Int32(3)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$add": ["$i", "$i"]}), &d),
            Bson::Int64(4_000_000_000)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$add": ["$l", 1]}), &d),
            Bson::Double(i64::MAX as f64 + 1.0)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$add": [1, "$f"]}), &d),
            Bson::Double(2.5)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$add": [1, "$zz"]}), &d),
            Bson::Null
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$add": ["$dt", 500]}), &d),
            Bson::DateTime(bson::DateTime::from_millis(1500))
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$add": [1, "$s"]}), &d)
                .unwrap_err()
                .code,
            16554
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$subtract": [5, 7]}), &d),
            Bson::Int32(-2)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$subtract": ["$dt", "$dt"]}), &d),
            Bson::Int64(0)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$multiply": [3, "$f"]}), &d),
            Bson::Double(4.5)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$multiply": ["$i", 2]}), &d),
            Bson::Int64(4_000_000_000)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$divide": [6, 4]}), &d),
            Bson::Double(1.5)
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$divide": [6, 0]}), &d)
                .unwrap_err()
                .code,
            16608
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$mod": [7, 3]}), &d),
            Bson::Int32(1)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$mod": [7.5, 2]}), &d),
            Bson::Double(1.5)
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$mod": [7, 0]}), &d)
                .unwrap_err()
                .code,
            16610
        );
        assert_eq!(ok(Bson::Document(doc! {"$abs": -5}), &d), Bson::Int32(5));
        assert_eq!(
            ok(Bson::Document(doc! {"$abs": i32::MIN}), &d),
            Bson::Int64(2_147_483_648)
        );
        assert_eq!(ok(Bson::Document(doc! {"$abs": null}), &d), Bson::Null);
    }

    #[test]
    fn strings_and_arrays() {
        let d = doc! {"s": "AbC", "arr": [1, 2, 3], "n": 5};
        assert_eq!(
            ok(Bson::Document(doc! {"$concat": ["$s", "-", "x"]}), &d),
            Bson::String("AbC-x".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$concat": ["$s", "$zz"]}), &d),
            Bson::Null
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$concat": ["$s", 1]}), &d)
                .unwrap_err()
                .code,
            16702
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toLower": "$s"}), &d),
            Bson::String("abc".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toUpper": "$s"}), &d),
            Bson::String("ABC".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toUpper": "$zz"}), &d),
            Bson::String("".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$strLenBytes": "é"}), &d),
            Bson::Int32(2)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$size": "$arr"}), &d),
            Bson::Int32(3)
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$size": "$n"}), &d)
                .unwrap_err()
                .code,
            17124
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$arrayElemAt": ["$arr", -1]}), &d),
            Bson::Int32(3)
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$arrayElemAt": ["$arr", 5]}), &d).unwrap(),
            None
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$first": "$arr"}), &d),
            Bson::Int32(1)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$last": "$arr"}), &d),
            Bson::Int32(3)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$concatArrays": ["$arr", [4]]}), &d),
            bson::bson!([1, 2, 3, 4])
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$isArray": ["$arr"]}), &d),
            Bson::Boolean(true)
        );
        assert_eq!(
            ok(
                Bson::Document(
                    doc! {"$map": {"input": "$arr", "as": "x", "in": {"$multiply": ["$$x", 10]}}}
                ),
                &d
            ),
            bson::bson!([10, 20, 30])
        );
        assert_eq!(
            ok(
                Bson::Document(
                    doc! {"$filter": {"input": "$arr", "cond": {"$gte": ["$$this", 2]}}}
                ),
                &d
            ),
            bson::bson!([2, 3])
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$sum": "$arr"}), &d),
            Bson::Int32(6)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$sum": [1, 2.5, "x"]}), &d),
            Bson::Double(3.5)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$avg": "$arr"}), &d),
            Bson::Double(2.0)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$max": "$arr"}), &d),
            Bson::Int32(3)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$min": [5, null, 2]}), &d),
            Bson::Int32(2)
        );
        assert_eq!(ok(Bson::Document(doc! {"$avg": []}), &d), Bson::Null);
    }

    #[test]
    fn types_and_conversions() {
        let d = doc! {"i": 5, "s": "42", "f": 2.9, "b": true};
        assert_eq!(
            ok(Bson::Document(doc! {"$type": "$i"}), &d),
            Bson::String("int".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$type": "$zz"}), &d),
            Bson::String("missing".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toString": "$i"}), &d),
            Bson::String("5".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toString": "$b"}), &d),
            Bson::String("true".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toInt": "$s"}), &d),
            Bson::Int32(42)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toInt": "$f"}), &d),
            Bson::Int32(2)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toLong": "$i"}), &d),
            Bson::Int64(5)
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$toDouble": "$s"}), &d),
            Bson::Double(42.0)
        );
        assert_eq!(ok(Bson::Document(doc! {"$toInt": "$zz"}), &d), Bson::Null);
        assert_eq!(
            ev(Bson::Document(doc! {"$toInt": "abc"}), &d)
                .unwrap_err()
                .code,
            241
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$toInt": 3e10}), &d)
                .unwrap_err()
                .code,
            241
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$toString": bson::DateTime::from_millis(0)}),
                &d
            ),
            Bson::String("1970-01-01T00:00:00.000Z".into())
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$literal": "$i"}), &d),
            Bson::String("$i".into())
        );
    }

    #[test]
    fn object_operators() {
        let d = doc! {"_id": 1, "a.b": 5, "$x": 6, "o": {"p": 1, "q": 2}};
        assert_eq!(
            ok(Bson::Document(doc! {"$getField": "a.b"}), &d),
            Bson::Int32(5)
        );
        assert_eq!(
            ok(
                Bson::Document(
                    doc! {"$getField": {"field": {"$literal": "$x"}, "input": "$$ROOT"}}
                ),
                &d
            ),
            Bson::Int32(6)
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$setField": {"field": "c.d", "input": "$$ROOT", "value": 9}}),
                &d
            ),
            Bson::Document(doc! {"_id": 1, "a.b": 5, "$x": 6, "o": {"p": 1, "q": 2}, "c.d": 9})
        );
        assert_eq!(
            ok(
                Bson::Document(
                    doc! {"$setField": {"field": "a.b", "input": "$$ROOT", "value": "$$REMOVE"}}
                ),
                &d
            ),
            Bson::Document(doc! {"_id": 1, "$x": 6, "o": {"p": 1, "q": 2}})
        );
        assert_eq!(
            ok(
                Bson::Document(
                    doc! {"$unsetField": {"field": {"$literal": "$x"}, "input": "$$ROOT"}}
                ),
                &d
            ),
            Bson::Document(doc! {"_id": 1, "a.b": 5, "o": {"p": 1, "q": 2}})
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$mergeObjects": ["$o", {"q": 3, "r": 4}, null]}),
                &d
            ),
            Bson::Document(doc! {"p": 1, "q": 3, "r": 4})
        );
        assert_eq!(
            ok(Bson::Document(doc! {"$objectToArray": "$o"}), &d),
            bson::bson!([{"k": "p", "v": 1}, {"k": "q", "v": 2}])
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$arrayToObject": [[["a", 1], ["b", 2]]]}),
                &d
            ),
            Bson::Document(doc! {"a": 1, "b": 2})
        );
        assert_eq!(
            ok(
                Bson::Document(doc! {"$arrayToObject": {"$literal": [{"k": "a", "v": 1}]}}),
                &d
            ),
            Bson::Document(doc! {"a": 1})
        );
        assert_eq!(
            ev(
                Bson::Document(doc! {"$setField": {"field": "$x", "input": "$$ROOT", "value": 1}}),
                &d
            )
            .unwrap_err()
            .code,
            4161108
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$foo": 1}), &d).unwrap_err().code,
            168
        );
        assert_eq!(
            ev(Bson::Document(doc! {"$add": [1], "$x": 1}), &d)
                .unwrap_err()
                .code,
            15983
        );
    }

    #[test]
    fn decimal_arithmetic_is_exact() {
        let d = |s: &str| Bson::Decimal128(Decimal128::from_str(s).unwrap());
        assert_eq!(
            num_add(&d("0.1"), &d("0.2")).to_string(),
            d("0.3").to_string()
        );
        assert_eq!(
            num_add(&d("1.0"), &d("2.00")).to_string(),
            d("3.00").to_string()
        );
        assert_eq!(
            num_add(&d("1.5"), &Bson::Int32(2)).to_string(),
            d("3.5").to_string()
        );
        assert_eq!(num_sub(&d("1"), &d("3")).to_string(), d("-2").to_string());
        assert_eq!(
            num_mul(&d("1.5"), &Bson::Int64(3)).to_string(),
            d("4.5").to_string()
        );
        assert_eq!(
            num_add(&d("0.1"), &Bson::Double(0.2)).to_string(),
            d("0.3").to_string()
        );
        assert!(matches!(
            num_add(&d("1"), &Bson::Int32(1)),
            Bson::Decimal128(_)
        ));
    }

    #[test]
    fn truthiness() {
        assert!(!is_truthy(None));
        assert!(!is_truthy(Some(&Bson::Int64(0))));
        assert!(!is_truthy(Some(&Bson::Double(-0.0))));
        assert!(is_truthy(Some(&Bson::String(String::new()))));
        assert!(is_truthy(Some(&Bson::Array(vec![]))));
    }
}

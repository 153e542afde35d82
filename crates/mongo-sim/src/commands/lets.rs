//! Command-level `let` (find, aggregate, update, delete, findAndModify) and the parse-time
//! check that every `$$variable` an expression uses is defined (17276), as MongoDB does before
//! it looks at any document.

use std::{collections::HashSet, sync::Arc};

use bson::{Bson, Document};

use crate::{
    error::{CommandError, CommandResult},
    query::expr::{evaluate_optional, Variables},
};

/// Bound `let` variables, in declaration order.
pub type Lets = Arc<Vec<(String, Bson)>>;

/// System variables every expression may use.
const SYSTEM: &[&str] = &[
    "ROOT",
    "CURRENT",
    "REMOVE",
    "NOW",
    "CLUSTER_TIME",
    "DESCEND",
    "PRUNE",
    "KEEP",
    "SEARCH_META",
    "USER_ROLES",
];

/// `validateNameForUserWrite`: a lowercase ASCII letter or a non-ASCII character first, then
/// letters, digits, `_` or non-ASCII characters.
fn validate_name(name: &str) -> CommandResult<()> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(CommandError::new(
            16866,
            "empty variable names are not allowed",
        ));
    };
    if !first.is_ascii_lowercase() && first.is_ascii() {
        return Err(CommandError::new(
            16867,
            format!("'{name}' starts with an invalid character for a user variable name"),
        ));
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || !c.is_ascii())) {
        return Err(CommandError::new(
            16868,
            format!("'{name}' contains an invalid character for a variable name: '{c}'"),
        ));
    }
    Ok(())
}

fn uses_field_path(v: &Bson) -> bool {
    match v {
        Bson::String(s) => s.starts_with('$') && !s.starts_with("$$"),
        Bson::Array(a) => a.iter().any(uses_field_path),
        Bson::Document(d) => d.iter().any(|(k, v)| k != "$literal" && uses_field_path(v)),
        _ => false,
    }
}

/// Evaluates a command's `let` (or an update statement's `c`): constant expressions, each
/// may use the system variables and the variables declared before it.
pub fn parse(
    field: &str,
    spec: Option<&Bson>,
    now: bson::DateTime,
    cluster_time: bson::Timestamp,
    outer: &Lets,
) -> CommandResult<Lets> {
    let spec = match spec {
        None => return Ok(Arc::clone(outer)),
        Some(Bson::Document(d)) => d,
        Some(other) => {
            return Err(CommandError::type_mismatch(format!(
                "BSON field '{field}' is the wrong type '{}', expected type 'object'",
                crate::query::compare::type_name(other)
            )))
        }
    };
    let mut bound: Vec<(String, Bson)> = outer.as_ref().clone();
    for (name, expr) in spec {
        validate_name(name)?;
        if uses_field_path(expr) {
            return Err(CommandError::new(
                4890500,
                "Command let Expression tried to access a field, but this is not allowed because command let expressions run before the query examines any documents.",
            ));
        }
        check_expression(expr, &bound)?;
        let vars = Variables::new(now)
            .with_cluster_time(cluster_time)
            .with_lets(&bound);
        let value = evaluate_optional(expr, &Document::new(), &vars)?.unwrap_or(Bson::Null);
        bound.retain(|(n, _)| n != name);
        bound.push((name.clone(), value));
    }
    Ok(Arc::new(bound))
}

/// Names an expression tree binds for its own sub-expressions (`$let`, `$map`, `$filter`,
/// `$reduce`). Scoping is not tracked: a name bound anywhere in the tree counts as defined.
fn collect_scoped(v: &Bson, out: &mut HashSet<String>) {
    match v {
        Bson::Array(a) => a.iter().for_each(|x| collect_scoped(x, out)),
        Bson::Document(d) => {
            for (k, v) in d {
                match (k.as_str(), v) {
                    ("$literal", _) => continue,
                    ("$let", Bson::Document(l)) => {
                        if let Ok(vars) = l.get_document("vars") {
                            out.extend(vars.keys().cloned());
                        }
                    }
                    ("$map" | "$filter", Bson::Document(m)) => {
                        out.insert(m.get_str("as").unwrap_or("this").to_string());
                    }
                    ("$reduce", _) => {
                        out.insert("this".into());
                        out.insert("value".into());
                    }
                    _ => {}
                }
                collect_scoped(v, out);
            }
        }
        _ => {}
    }
}

fn check_refs(v: &Bson, defined: &dyn Fn(&str) -> bool) -> CommandResult<()> {
    match v {
        Bson::String(s) if s.starts_with("$$") => {
            let name = s[2..].split('.').next().unwrap_or("");
            if defined(name) {
                Ok(())
            } else {
                Err(CommandError::new(
                    17276,
                    format!("Use of undefined variable: {name}"),
                ))
            }
        }
        Bson::Array(a) => a.iter().try_for_each(|x| check_refs(x, defined)),
        Bson::Document(d) => d
            .iter()
            .filter(|(k, _)| *k != "$literal")
            .try_for_each(|(_, v)| check_refs(v, defined)),
        _ => Ok(()),
    }
}

/// Every `$$name` in an aggregation expression is a system variable, a `let` variable or a
/// name the expression binds itself.
pub fn check_expression(expr: &Bson, lets: &[(String, Bson)]) -> CommandResult<()> {
    let mut scoped = HashSet::new();
    collect_scoped(expr, &mut scoped);
    check_refs(expr, &|name| {
        SYSTEM.contains(&name) || scoped.contains(name) || lets.iter().any(|(n, _)| n == name)
    })
}

/// The expressions of a query filter: `$expr`, also under `$and`/`$or`/`$nor`.
pub fn check_filter(filter: &Document, lets: &[(String, Bson)]) -> CommandResult<()> {
    for (k, v) in filter {
        match (k.as_str(), v) {
            ("$expr", e) => check_expression(e, lets)?,
            ("$and" | "$or" | "$nor", Bson::Array(a)) => {
                for f in a {
                    if let Bson::Document(f) = f {
                        check_filter(f, lets)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A `find` projection: computed fields are expressions; `$elemMatch` holds a filter.
pub fn check_projection(projection: &Document, lets: &[(String, Bson)]) -> CommandResult<()> {
    for (_, v) in projection {
        match v {
            Bson::Document(d) if d.contains_key("$elemMatch") || d.contains_key("$slice") => {}
            other => check_expression(other, lets)?,
        }
    }
    Ok(())
}

/// Pipeline stages: `$match` holds a filter, the others expressions.
pub fn check_pipeline(stages: &[Document], lets: &[(String, Bson)]) -> CommandResult<()> {
    for stage in stages {
        for (name, spec) in stage {
            match (name.as_str(), spec) {
                ("$match", Bson::Document(f)) => check_filter(f, lets)?,
                ("$changeStream" | "$sort" | "$limit" | "$skip" | "$count" | "$unset", _) => {}
                (_, spec) => check_expression(spec, lets)?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bson::{doc, Timestamp};

    use super::*;

    fn lets(spec: Document) -> CommandResult<Lets> {
        parse(
            "find.let",
            Some(&Bson::Document(spec)),
            bson::DateTime::from_millis(5),
            Timestamp {
                time: 1,
                increment: 1,
            },
            &Lets::default(),
        )
    }

    #[test]
    fn let_values_are_evaluated_once() {
        let l = lets(doc! {"x": {"$add": [1, 2]}, "y": "$$x", "t": "$$NOW"}).unwrap();
        assert_eq!(
            l.as_slice(),
            &[
                ("x".to_string(), Bson::Int32(3)),
                ("y".to_string(), Bson::Int32(3)),
                (
                    "t".to_string(),
                    Bson::DateTime(bson::DateTime::from_millis(5))
                ),
            ]
        );
        assert_eq!(lets(doc! {"X": 1}).unwrap_err().code, 16867);
        assert_eq!(lets(doc! {"a-b": 1}).unwrap_err().code, 16868);
        assert_eq!(lets(doc! {"a": "$field"}).unwrap_err().code, 4890500);
        assert_eq!(lets(doc! {"a": "$$undefined"}).unwrap_err().code, 17276);
    }

    #[test]
    fn undefined_variables_are_17276() {
        let l = vec![("x".to_string(), Bson::Int32(1))];
        assert!(check_filter(&doc! {"$expr": {"$eq": ["$a", "$$x"]}}, &l).is_ok());
        let e = check_filter(&doc! {"$or": [{"$expr": {"$eq": ["$a", "$$y"]}}]}, &l).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (17276, "Use of undefined variable: y")
        );
        // Outside $expr, "$$y" is a literal string.
        assert!(check_filter(&doc! {"a": "$$y"}, &l).is_ok());
        assert!(check_expression(
            &Bson::Document(doc! {"$map": {"input": "$a", "as": "e", "in": "$$e.v"}}),
            &[]
        )
        .is_ok());
        assert!(check_expression(&Bson::Document(doc! {"$literal": "$$zz"}), &[]).is_ok());
        assert!(check_pipeline(&[doc! {"$set": {"n": "$$NOW", "r": "$$ROOT.a"}}], &[]).is_ok());
    }
}

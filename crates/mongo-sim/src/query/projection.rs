//! Projections (`find` `projection`, `$project`, `$unset`) and the `$addFields` engine.

use bson::{Bson, Document};

use super::expr::{evaluate_optional, Variables};
use super::matcher::Matcher;
use crate::error::{CommandError, CommandResult};

/// A compiled projection.
#[derive(Debug, Clone)]
pub struct Projection {
    kind: Kind,
    root: Node,
    /// find-only `$slice` / `$elemMatch` operators on top-level or dotted paths.
    slices: Vec<(String, Option<i64>, i64)>,
    elem_matches: Vec<(String, Matcher)>,
    now: Option<bson::DateTime>,
    /// Command-level `let` variables.
    lets: std::sync::Arc<Vec<(String, Bson)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Identity,
    Inclusion,
    Exclusion,
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: Vec<(String, Item)>,
}

#[derive(Debug, Clone)]
enum Item {
    Include,
    Exclude,
    Expr(Bson),
    Sub(Node),
    /// Placeholder for a field handled by `$slice`/`$elemMatch` (included in inclusion mode).
    Special,
}

impl Node {
    fn get(&self, k: &str) -> Option<&Item> {
        self.children.iter().find(|(n, _)| n == k).map(|(_, i)| i)
    }

    fn get_mut(&mut self, k: &str) -> Option<&mut Item> {
        self.children
            .iter_mut()
            .find(|(n, _)| n == k)
            .map(|(_, i)| i)
    }

    fn has_exprs(&self) -> bool {
        self.children.iter().any(|(_, i)| match i {
            Item::Expr(_) => true,
            Item::Sub(s) => s.has_exprs(),
            _ => false,
        })
    }

    /// Inserts an item at a dotted path, creating sub-nodes; path collisions are errors.
    fn insert(&mut self, full: &str, parts: &[&str], item: Item) -> CommandResult<()> {
        let (first, rest) = parts.split_first().expect("non-empty");
        if rest.is_empty() {
            if self.get(first).is_some() {
                return Err(CommandError::new(
                    31250,
                    format!("Path collision at {full}"),
                ));
            }
            self.children.push((first.to_string(), item));
            return Ok(());
        }
        match self.get_mut(first) {
            Some(Item::Sub(sub)) => sub.insert(full, rest, item),
            Some(_) => Err(CommandError::new(
                31249,
                format!(
                    "Path collision at {full} remaining portion {}",
                    rest.join(".")
                ),
            )),
            None => {
                let mut sub = Node::default();
                sub.insert(full, rest, item)?;
                self.children.push((first.to_string(), Item::Sub(sub)));
                Ok(())
            }
        }
    }
}

fn is_operator_doc(d: &Document) -> bool {
    d.keys().next().is_some_and(|k| k.starts_with('$'))
}

fn check_field_name(k: &str) -> CommandResult<()> {
    if k.is_empty() || k.split('.').any(|p| p.is_empty()) {
        return Err(CommandError::new(
            40352,
            "FieldPath cannot be constructed with empty string",
        ));
    }
    if k.split('.').any(|p| p.starts_with('$')) {
        return Err(CommandError::new(
            16410,
            "FieldPath field names may not start with '$'. Consider using $getField or $setField."
                .to_string(),
        ));
    }
    Ok(())
}

impl Projection {
    /// Compiles a `find` projection (supports `$slice` and `$elemMatch`).
    pub fn new(spec: &Document) -> CommandResult<Projection> {
        Self::build(spec, true)
    }

    /// Compiles a `$project` stage specification.
    pub fn new_stage(spec: &Document) -> CommandResult<Projection> {
        if spec.is_empty() {
            return Err(CommandError::new(
                51272,
                "Invalid $project :: caused by :: projection specification must have at least one field",
            ));
        }
        Self::build(spec, false)
    }

    /// An exclusion projection of the given paths (the `$unset` stage).
    pub fn exclusion(paths: &[String]) -> CommandResult<Projection> {
        let mut root = Node::default();
        for p in paths {
            check_field_name(p)?;
            let parts: Vec<&str> = p.split('.').collect();
            root.insert(p, &parts, Item::Exclude)?;
        }
        Ok(Projection {
            kind: Kind::Exclusion,
            root,
            slices: Vec::new(),
            elem_matches: Vec::new(),
            now: None,
            lets: Default::default(),
        })
    }

    /// Sets `$$NOW` for expressions.
    pub fn with_now(mut self, now: bson::DateTime) -> Self {
        self.now = Some(now);
        self
    }

    /// Binds the command's `let` variables for expressions.
    pub fn with_lets(mut self, lets: std::sync::Arc<Vec<(String, Bson)>>) -> Self {
        self.lets = lets;
        self
    }

    fn build(spec: &Document, find: bool) -> CommandResult<Projection> {
        let mut root = Node::default();
        let mut kind = Kind::Identity;
        let mut id_item: Option<Item> = None;
        let mut slices = Vec::new();
        let mut elem_matches = Vec::new();
        let mut entries: Vec<(String, Bson)> = Vec::new();
        flatten_spec(spec, "", &mut entries, false)?;
        for (path, v) in entries {
            let parts: Vec<&str> = path.split('.').collect();
            let item = match &v {
                Bson::Boolean(_)
                | Bson::Int32(_)
                | Bson::Int64(_)
                | Bson::Double(_)
                | Bson::Decimal128(_) => {
                    if super::expr::is_truthy(Some(&v)) {
                        Item::Include
                    } else {
                        Item::Exclude
                    }
                }
                Bson::Document(d) if is_operator_doc(d) => {
                    let op = d.keys().next().expect("non-empty").as_str();
                    match op {
                        "$slice" if find && d.len() == 1 => {
                            let (skip, limit) = parse_slice(d.get("$slice").expect("present"))?;
                            slices.push((path.clone(), skip, limit));
                            root.insert(&path, &parts, Item::Special)?;
                            continue;
                        }
                        "$elemMatch" if find && d.len() == 1 => {
                            if parts.len() > 1 {
                                return Err(CommandError::bad_value(
                                    "Cannot use $elemMatch projection on a nested field.",
                                ));
                            }
                            let Some(Bson::Document(cond)) = d.get("$elemMatch") else {
                                return Err(CommandError::bad_value(
                                    "elemMatch: Invalid argument, object required.",
                                ));
                            };
                            let mut wrapped = Document::new();
                            wrapped.insert(path.clone(), Bson::Document(doc_elem_match(cond)));
                            elem_matches.push((path.clone(), Matcher::new(&wrapped)?));
                            mark(&mut kind, Kind::Inclusion, &path)?;
                            root.insert(&path, &parts, Item::Special)?;
                            continue;
                        }
                        "$meta" => {
                            return Err(CommandError::bad_value(
                                "$meta projections are not supported by mongo-sim",
                            ))
                        }
                        _ => Item::Expr(v.clone()),
                    }
                }
                _ => Item::Expr(v.clone()),
            };
            if path == "_id" {
                match item {
                    Item::Expr(_) => {
                        mark(&mut kind, Kind::Inclusion, &path)?;
                        id_item = Some(item);
                    }
                    other => id_item = Some(other),
                }
                continue;
            }
            match item {
                Item::Include | Item::Expr(_) => {
                    if kind == Kind::Exclusion {
                        if matches!(item, Item::Expr(_)) {
                            return Err(CommandError::new(
                                31252,
                                "Cannot use expression other than $meta in exclusion projection"
                                    .to_string(),
                            ));
                        }
                        return Err(CommandError::new(
                            31253,
                            format!("Cannot do inclusion on field {path} in exclusion projection"),
                        ));
                    }
                    kind = Kind::Inclusion;
                }
                Item::Exclude => {
                    if kind == Kind::Inclusion {
                        return Err(CommandError::new(
                            31254,
                            format!("Cannot do exclusion on field {path} in inclusion projection"),
                        ));
                    }
                    kind = Kind::Exclusion;
                }
                _ => {}
            }
            root.insert(&path, &parts, item)?;
        }
        // Slices alone behave like an exclusion projection of nothing.
        if kind == Kind::Identity && (!slices.is_empty() || id_item.is_some()) {
            kind = match &id_item {
                Some(Item::Include) if slices.is_empty() => Kind::Inclusion,
                _ => Kind::Exclusion,
            };
        }
        match (kind, id_item) {
            (Kind::Inclusion, None) | (Kind::Inclusion, Some(Item::Include)) => {
                root.children.insert(0, ("_id".into(), Item::Include))
            }
            (Kind::Inclusion, Some(Item::Expr(e))) => {
                root.children.push(("_id".into(), Item::Expr(e)))
            }
            (Kind::Exclusion, Some(Item::Exclude)) => {
                root.children.insert(0, ("_id".into(), Item::Exclude))
            }
            _ => {}
        }
        Ok(Projection {
            kind,
            root,
            slices,
            elem_matches,
            now: None,
            lets: Default::default(),
        })
    }

    /// Whether this is an inclusion projection.
    pub fn is_inclusion(&self) -> bool {
        self.kind == Kind::Inclusion
    }

    /// Applies the projection to a document.
    pub fn apply(&self, doc: &Document) -> CommandResult<Document> {
        let vars =
            Variables::new(self.now.unwrap_or_else(bson::DateTime::now)).with_lets(&self.lets);
        let mut out = match self.kind {
            Kind::Identity => doc.clone(),
            Kind::Inclusion => apply_inclusion(&self.root, doc, doc, &vars)?,
            Kind::Exclusion => apply_exclusion(&self.root, doc),
        };
        for (path, skip, limit) in &self.slices {
            if let Some(Bson::Array(a)) = super::path::get_path_mut(&mut out, path) {
                *a = slice_array(a, *skip, *limit);
            }
            if self.kind == Kind::Inclusion {
                if let Some(v) = super::path::get_path(doc, path) {
                    if super::path::get_path(&out, path).is_none() {
                        let v = match v {
                            Bson::Array(a) => Bson::Array(slice_array(a, *skip, *limit)),
                            other => other.clone(),
                        };
                        let _ = super::path::set_path(&mut out, path, v);
                    }
                }
            }
        }
        for (field, m) in &self.elem_matches {
            out.remove(field);
            if let Some(Bson::Array(a)) = doc.get(field) {
                for e in a {
                    let mut probe = Document::new();
                    probe.insert(field.clone(), Bson::Array(vec![e.clone()]));
                    if m.matches(&probe) {
                        out.insert(field.clone(), Bson::Array(vec![e.clone()]));
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}

fn doc_elem_match(cond: &Document) -> Document {
    let mut d = Document::new();
    d.insert("$elemMatch", cond.clone());
    d
}

fn mark(kind: &mut Kind, want: Kind, path: &str) -> CommandResult<()> {
    if *kind == Kind::Exclusion && want == Kind::Inclusion {
        return Err(CommandError::new(
            31253,
            format!("Cannot do inclusion on field {path} in exclusion projection"),
        ));
    }
    *kind = want;
    Ok(())
}

/// Flattens nested specification objects into dotted paths. An empty object is an error in
/// projections and a literal `{}` in `$addFields` (`empty_is_literal`).
fn flatten_spec(
    spec: &Document,
    prefix: &str,
    out: &mut Vec<(String, Bson)>,
    empty_is_literal: bool,
) -> CommandResult<()> {
    for (k, v) in spec {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        check_field_name(&path)?;
        match v {
            Bson::Document(d) if !is_operator_doc(d) => {
                if d.is_empty() && empty_is_literal {
                    out.push((path, Bson::Document(Document::new())));
                    continue;
                }
                if d.is_empty() {
                    return Err(CommandError::new(
                        51270,
                        format!("An empty sub-projection is not a valid value. Found empty object at path {path}"),
                    ));
                }
                flatten_spec(d, &path, out, empty_is_literal)?;
            }
            other => out.push((path, other.clone())),
        }
    }
    Ok(())
}

fn parse_slice(v: &Bson) -> CommandResult<(Option<i64>, i64)> {
    let int = |b: &Bson| -> Option<i64> {
        match b {
            Bson::Int32(i) => Some(*i as i64),
            Bson::Int64(i) => Some(*i),
            Bson::Double(d) if d.is_finite() => Some(d.trunc() as i64),
            _ => None,
        }
    };
    match v {
        Bson::Array(a) if a.len() == 2 => {
            let skip = int(&a[0])
                .ok_or_else(|| CommandError::bad_value("$slice skip must be a number"))?;
            let limit = int(&a[1])
                .ok_or_else(|| CommandError::bad_value("$slice limit must be a number"))?;
            if limit <= 0 {
                return Err(CommandError::bad_value("$slice limit must be positive"));
            }
            Ok((Some(skip), limit))
        }
        other => match int(other) {
            Some(n) => Ok((None, n)),
            None => Err(CommandError::bad_value(
                "$slice only supports numbers and [skip, limit] arrays",
            )),
        },
    }
}

fn slice_array(a: &[Bson], skip: Option<i64>, limit: i64) -> Vec<Bson> {
    let len = a.len() as i64;
    let (start, count) = match skip {
        None => {
            if limit >= 0 {
                (0, limit)
            } else {
                ((len + limit).max(0), -limit)
            }
        }
        Some(s) => {
            let start = if s < 0 { (len + s).max(0) } else { s.min(len) };
            (start, limit)
        }
    };
    let end = (start + count).min(len);
    a[start as usize..end.max(start) as usize].to_vec()
}

fn apply_inclusion(
    node: &Node,
    doc: &Document,
    root: &Document,
    vars: &Variables,
) -> CommandResult<Document> {
    let mut out = include_fields(node, doc)?;
    apply_expressions(node, &mut out, root, vars)?;
    Ok(out)
}

/// Inclusion of a sub-document's fields without computing expressions (done afterwards).
fn apply_inclusion_fields(node: &Node, doc: &Document) -> CommandResult<Bson> {
    include_fields(node, doc).map(Bson::Document)
}

/// The fields of `doc` that `node` includes, recursively; expressions are not computed here.
fn include_fields(node: &Node, doc: &Document) -> CommandResult<Document> {
    let mut out = Document::new();
    for (k, v) in doc {
        match node.get(k) {
            Some(Item::Include) | Some(Item::Special) => {
                out.insert(k.clone(), v.clone());
            }
            Some(Item::Sub(sub)) => match v {
                Bson::Document(d) => {
                    out.insert(k.clone(), apply_inclusion_fields(sub, d)?);
                }
                Bson::Array(a) => {
                    out.insert(k.clone(), Bson::Array(inclusion_array(sub, a)?));
                }
                _ => {}
            },
            _ => {}
        }
    }
    Ok(out)
}

fn inclusion_array(node: &Node, a: &[Bson]) -> CommandResult<Vec<Bson>> {
    let mut out = Vec::new();
    for e in a {
        match e {
            Bson::Document(d) => out.push(apply_inclusion_fields(node, d)?),
            Bson::Array(inner) => out.push(Bson::Array(inclusion_array(node, inner)?)),
            _ => {}
        }
    }
    Ok(out)
}

/// Adds computed fields (in specification order) to an already projected document.
fn apply_expressions(
    node: &Node,
    out: &mut Document,
    root: &Document,
    vars: &Variables,
) -> CommandResult<()> {
    for (k, item) in &node.children {
        match item {
            Item::Expr(e) => match evaluate_optional(e, root, vars)? {
                Some(v) => {
                    out.insert(k.clone(), v);
                }
                None => {
                    out.remove(k);
                }
            },
            Item::Sub(sub) if sub.has_exprs() => {
                let existing = out.remove_entry_keep(k);
                let v = expressions_into_value(sub, existing, root, vars)?;
                out.insert(k.clone(), v);
            }
            _ => {}
        }
    }
    Ok(())
}

trait KeepPosition {
    fn remove_entry_keep(&mut self, k: &str) -> Option<Bson>;
}

impl KeepPosition for Document {
    /// Takes the value out while leaving the key in place (a later insert keeps the position).
    fn remove_entry_keep(&mut self, k: &str) -> Option<Bson> {
        self.get_mut(k).map(|v| std::mem::replace(v, Bson::Null))
    }
}

fn expressions_into_value(
    node: &Node,
    existing: Option<Bson>,
    root: &Document,
    vars: &Variables,
) -> CommandResult<Bson> {
    match existing {
        Some(Bson::Document(mut d)) => {
            apply_expressions(node, &mut d, root, vars)?;
            Ok(Bson::Document(d))
        }
        Some(Bson::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for e in a {
                out.push(expressions_into_value(node, Some(e), root, vars)?);
            }
            Ok(Bson::Array(out))
        }
        _ => {
            let mut d = Document::new();
            apply_expressions(node, &mut d, root, vars)?;
            Ok(Bson::Document(d))
        }
    }
}

fn apply_exclusion(node: &Node, doc: &Document) -> Document {
    let mut out = Document::new();
    for (k, v) in doc {
        match node.get(k) {
            Some(Item::Exclude) => {}
            Some(Item::Sub(sub)) => {
                out.insert(k.clone(), exclusion_value(sub, v));
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

fn exclusion_value(node: &Node, v: &Bson) -> Bson {
    match v {
        Bson::Document(d) => Bson::Document(apply_exclusion(node, d)),
        Bson::Array(a) => Bson::Array(a.iter().map(|e| exclusion_value(node, e)).collect()),
        other => other.clone(),
    }
}

/// A compiled `$addFields`/`$set` stage: every expression is evaluated against the input
/// document, then written; existing fields keep their position, new ones are appended;
/// nested objects and dotted paths merge into sub-documents (and into each element of arrays).
#[derive(Debug, Clone)]
pub struct AddFields {
    root: Node,
}

impl AddFields {
    pub fn new(spec: &Document) -> CommandResult<AddFields> {
        if spec.is_empty() {
            return Err(CommandError::new(
                40177,
                "Invalid $addFields :: caused by :: specification must have at least one field",
            ));
        }
        let mut entries = Vec::new();
        flatten_spec(spec, "", &mut entries, true)?;
        let mut root = Node::default();
        for (path, v) in entries {
            let parts: Vec<&str> = path.split('.').collect();
            root.insert(&path, &parts, Item::Expr(v))?;
        }
        Ok(AddFields { root })
    }

    pub fn apply(&self, doc: &Document, vars: &Variables) -> CommandResult<Document> {
        let mut out = doc.clone();
        apply_expressions(&self.root, &mut out, doc, vars)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn p(spec: Document, d: Document) -> Document {
        Projection::new(&spec).unwrap().apply(&d).unwrap()
    }

    fn keys(d: &Document) -> Vec<String> {
        d.keys().cloned().collect()
    }

    #[test]
    fn inclusion_keeps_document_order_and_id() {
        let d = doc! {"_id": 1, "c": 3, "a": 1, "b": {"c": 5, "d": 6}};
        let r = p(doc! {"b.c": 1, "a": 1}, d.clone());
        assert_eq!(r, doc! {"_id": 1, "a": 1, "b": {"c": 5}});
        assert_eq!(keys(&r), vec!["_id", "a", "b"]);
        let r = p(doc! {"a": 1, "_id": 0}, d.clone());
        assert_eq!(r, doc! {"a": 1});
        let r = p(doc! {"_id": 1}, d.clone());
        assert_eq!(r, doc! {"_id": 1});
        let r = p(doc! {"b": {"d": true}}, d.clone());
        assert_eq!(r, doc! {"_id": 1, "b": {"d": 6}});
        assert_eq!(p(doc! {}, d.clone()), d);
        assert_eq!(p(doc! {"zz": 1}, d), doc! {"_id": 1});
    }

    #[test]
    fn inclusion_through_arrays_drops_scalars() {
        let d = doc! {"_id": 1, "a": [{"b": 1, "c": 2}, 5, [{"b": 3}], {"c": 4}]};
        assert_eq!(
            p(doc! {"a.b": 1}, d),
            doc! {"_id": 1, "a": [{"b": 1}, [{"b": 3}], {}]}
        );
    }

    #[test]
    fn exclusion() {
        let d = doc! {"_id": 1, "a": 1, "b": {"c": 5, "d": 6}, "arr": [{"x": 1, "y": 2}, 7]};
        assert_eq!(
            p(doc! {"a": 0, "b.c": 0, "arr.x": 0}, d.clone()),
            doc! {"_id": 1, "b": {"d": 6}, "arr": [{"y": 2}, 7]}
        );
        assert_eq!(
            p(doc! {"_id": 0}, d.clone()),
            doc! {"a": 1, "b": {"c": 5, "d": 6}, "arr": [{"x": 1, "y": 2}, 7]}
        );
        assert_eq!(p(doc! {"_id": false, "a": false}, d).get("_id"), None);
    }

    #[test]
    fn mixing_errors() {
        let e = Projection::new(&doc! {"a": 1, "b": 0}).unwrap_err();
        assert_eq!(e.code, 31254);
        assert_eq!(
            e.message,
            "Cannot do exclusion on field b in inclusion projection"
        );
        let e = Projection::new(&doc! {"a": 0, "b": 1}).unwrap_err();
        assert_eq!(e.code, 31253);
        assert!(Projection::new(&doc! {"a": 1, "_id": 0}).is_ok());
        assert!(Projection::new(&doc! {"a": 0, "_id": 1}).is_ok());
        assert_eq!(
            Projection::new(&doc! {"a": 1, "a.b": 1}).unwrap_err().code,
            31249
        );
        assert_eq!(
            Projection::new(&doc! {"a": 0, "x": "$a"}).unwrap_err().code,
            31252
        );
        assert_eq!(Projection::new(&doc! {"$a": 1}).unwrap_err().code, 16410);
        assert_eq!(Projection::new(&doc! {"a": {}}).unwrap_err().code, 51270);
        assert_eq!(Projection::new_stage(&doc! {}).unwrap_err().code, 51272);
    }

    #[test]
    fn computed_fields() {
        let d = doc! {"_id": 1, "a": 5, "b": {"c": 1}};
        let r = p(
            doc! {"x": "$a", "a": 1, "y": {"$literal": 1}, "z": "lit"},
            d.clone(),
        );
        assert_eq!(r, doc! {"_id": 1, "a": 5, "x": 5, "y": 1, "z": "lit"});
        assert_eq!(keys(&r), vec!["_id", "a", "x", "y", "z"]);
        // A computed field with the name of an existing included field stays in place.
        let r = p(doc! {"b": {"$add": ["$a", 1]}, "a": 1}, d.clone());
        assert_eq!(keys(&r), vec!["_id", "a", "b"]);
        assert_eq!(r.get("b"), Some(&Bson::Int32(6)));
        // Nested computed field merges into the included sub-document.
        let r = p(doc! {"b.c": 1, "b.n": "$a"}, d.clone());
        assert_eq!(r, doc! {"_id": 1, "b": {"c": 1, "n": 5}});
        // Missing values are not added.
        let r = p(doc! {"x": "$nope", "a": 1}, d);
        assert_eq!(r, doc! {"_id": 1, "a": 5});
    }

    #[test]
    fn slice_and_elem_match() {
        let d = doc! {"_id": 1, "a": [1, 2, 3, 4, 5], "b": 1, "c": [{"x": 1}, {"x": 2}, {"x": 2, "y": 1}]};
        assert_eq!(
            p(doc! {"a": {"$slice": 2}}, d.clone()),
            doc! {"_id": 1, "a": [1, 2], "b": 1, "c": [{"x": 1}, {"x": 2}, {"x": 2, "y": 1}]}
        );
        assert_eq!(
            p(doc! {"a": {"$slice": -2}, "b": 0, "c": 0}, d.clone()),
            doc! {"_id": 1, "a": [4, 5]}
        );
        assert_eq!(
            p(doc! {"a": {"$slice": [1, 2]}, "b": 1}, d.clone()),
            doc! {"_id": 1, "a": [2, 3], "b": 1}
        );
        assert_eq!(
            p(doc! {"a": {"$slice": [-2, 5]}, "b": 1}, d.clone()),
            doc! {"_id": 1, "a": [4, 5], "b": 1}
        );
        assert_eq!(
            p(doc! {"c": {"$elemMatch": {"x": 2}}}, d.clone()),
            doc! {"_id": 1, "c": [{"x": 2}]}
        );
        assert_eq!(
            p(doc! {"c": {"$elemMatch": {"x": 9}}, "b": 1}, d),
            doc! {"_id": 1, "b": 1}
        );
    }

    #[test]
    fn add_fields_semantics() {
        let vars = Variables::new(bson::DateTime::from_millis(0));
        let d = doc! {"_id": 1, "a": 1, "sub": {"x": 1}, "arr": [{"x": 1}, {"x": 2}]};
        let af =
            AddFields::new(&doc! {"z": "$a", "a": {"$add": ["$a", 1]}, "sub.y": 2, "arr.k": "$a"})
                .unwrap();
        let r = af.apply(&d, &vars).unwrap();
        assert_eq!(
            r,
            doc! {"_id": 1, "a": 2, "sub": {"x": 1, "y": 2}, "arr": [{"x": 1, "k": 1}, {"x": 2, "k": 1}], "z": 1}
        );
        assert_eq!(keys(&r), vec!["_id", "a", "sub", "arr", "z"]);
        let af = AddFields::new(&doc! {"a": "$$REMOVE", "n": {"m": 1}}).unwrap();
        assert_eq!(
            af.apply(&d, &vars).unwrap(),
            doc! {"_id": 1, "sub": {"x": 1}, "arr": [{"x": 1}, {"x": 2}], "n": {"m": 1}}
        );
        let af = AddFields::new(&doc! {"e": {}}).unwrap();
        assert_eq!(
            af.apply(&d, &vars).unwrap().get("e"),
            Some(&Bson::Document(doc! {}))
        );
        // A scalar in the way is replaced by a document of the computed fields.
        let af = AddFields::new(&doc! {"a.b": 5}).unwrap();
        assert_eq!(
            af.apply(&d, &vars).unwrap().get("a"),
            Some(&Bson::Document(doc! {"b": 5}))
        );
    }
}

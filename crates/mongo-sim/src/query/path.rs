//! Dotted-path utilities.
//!
//! Two different traversal semantics exist in MongoDB and both live here:
//! * query semantics ([`query_values`]): arrays are traversed implicitly, a numeric
//!   component indexes an array *and* matches fields named like the number in sub-documents;
//! * update semantics ([`get_path`], [`set_path`], [`unset_path`]): a path names exactly one
//!   location, numeric components index arrays, intermediate documents are created.

use std::fmt;

use bson::{Bson, Document};

use crate::error::{codes, CommandError, CommandResult};

/// One component of a resolved path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathPart {
    Field(String),
    Index(usize),
}

impl fmt::Display for PathPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPart::Field(s) => f.write_str(s),
            PathPart::Index(i) => write!(f, "{i}"),
        }
    }
}

/// Joins path parts with dots.
pub fn dotted(path: &[PathPart]) -> String {
    let mut s = String::new();
    for (i, p) in path.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(&p.to_string());
    }
    s
}

/// Splits a dotted path into its components.
pub fn split_path(path: &str) -> Vec<&str> {
    path.split('.').collect()
}

/// Parses a path component as an array index the way the server does (`parseUnsignedBase10Integer`
/// plus the rule that a leading zero makes it a field name, e.g. "01").
pub fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// Values reachable at `path` under query semantics. `None` entries mean "missing on this
/// branch": a document lacking the field, a scalar where a sub-document was needed, an array
/// element that is not a document when a field name follows (nested arrays are not
/// traversed), or an array that yields nothing at all (e.g. empty). This is what makes
/// `{"a.b": null}` match `{a: 4}`, `{a: []}`, `{a: [1, 2]}` and `{a: [{b: 1}, {}]}` but
/// not `{a: [{b: 1}]}` (the server's `null_query_semantics.js`).
/// Leaf arrays are returned whole: operators decide whether to look inside.
pub fn query_values<'a>(doc: &'a Document, path: &[String]) -> Vec<Option<&'a Bson>> {
    let mut out = Vec::with_capacity(1);
    match path.split_first() {
        None => {}
        Some((first, rest)) => match doc.get(first) {
            Some(v) => walk(v, rest, &mut out),
            None => out.push(None),
        },
    }
    out
}

fn walk<'a>(v: &'a Bson, rest: &[String], out: &mut Vec<Option<&'a Bson>>) {
    let Some((first, tail)) = rest.split_first() else {
        out.push(Some(v));
        return;
    };
    match v {
        Bson::Document(d) => match d.get(first) {
            Some(x) => walk(x, tail, out),
            None => out.push(None),
        },
        Bson::Array(arr) => {
            let before = out.len();
            let index = parse_index(first);
            if let Some(idx) = index {
                if let Some(e) = arr.get(idx) {
                    walk(e, tail, out);
                }
            }
            for e in arr {
                match e {
                    Bson::Document(d) => match d.get(first) {
                        Some(x) => walk(x, tail, out),
                        None => out.push(None),
                    },
                    // A positional component already addressed its element.
                    _ if index.is_some() => {}
                    _ => out.push(None),
                }
            }
            if out.len() == before {
                out.push(None);
            }
        }
        _ => out.push(None),
    }
}

/// Gets the single value at a path under update semantics (numeric components index arrays).
pub fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur = doc.get(first)?;
    for p in parts {
        cur = match cur {
            Bson::Document(d) => d.get(p)?,
            Bson::Array(a) => a.get(parse_index(p)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Gets the value at resolved path parts.
pub fn get_parts<'a>(doc: &'a Document, path: &[PathPart]) -> Option<&'a Bson> {
    let (first, rest) = path.split_first()?;
    let PathPart::Field(f) = first else {
        return None;
    };
    let mut cur = doc.get(f)?;
    for p in rest {
        cur = match (cur, p) {
            (Bson::Document(d), PathPart::Field(f)) => d.get(f)?,
            (Bson::Document(d), PathPart::Index(i)) => d.get(i.to_string())?,
            (Bson::Array(a), PathPart::Index(i)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Mutable access to the value at a path (update semantics); `None` if absent.
pub fn get_path_mut<'a>(doc: &'a mut Document, path: &str) -> Option<&'a mut Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur = doc.get_mut(first)?;
    for p in parts {
        cur = match cur {
            Bson::Document(d) => d.get_mut(p)?,
            Bson::Array(a) => a.get_mut(parse_index(p)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn short_repr(b: &Bson) -> String {
    let s = b.to_string();
    if s.len() > 150 {
        let mut cut = 150;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &s[..cut])
    } else {
        s
    }
}

fn cannot_create(field: &str, parent_name: &str, parent: &Bson) -> CommandError {
    CommandError::new(
        codes::PATH_NOT_VIABLE,
        format!(
            "Cannot create field '{field}' in element {{{parent_name}: {}}}",
            short_repr(parent)
        ),
    )
}

/// Sets `value` at a dotted path (update semantics): existing fields keep their position,
/// new fields are appended, missing intermediate documents are created, arrays are indexed by
/// numeric components (padding with nulls). Errors with PathNotViable (28) when a scalar or
/// an array with a non-numeric component is in the way.
pub fn set_path(doc: &mut Document, path: &str, value: Bson) -> CommandResult<()> {
    let parts: Vec<&str> = path.split('.').collect();
    set_in_doc(doc, &parts, value)
}

fn set_in_doc(doc: &mut Document, parts: &[&str], value: Bson) -> CommandResult<()> {
    let (first, rest) = parts.split_first().expect("non-empty path");
    if rest.is_empty() {
        doc.insert(*first, value);
        return Ok(());
    }
    match doc.get_mut(*first) {
        Some(child) => set_in_value(child, first, rest, value),
        None => {
            doc.insert(*first, build_nested(rest, value));
            Ok(())
        }
    }
}

fn set_in_value(cur: &mut Bson, cur_name: &str, parts: &[&str], value: Bson) -> CommandResult<()> {
    let (first, rest) = parts.split_first().expect("non-empty path");
    match cur {
        Bson::Document(d) => set_in_doc(d, parts, value),
        Bson::Array(arr) => {
            let Some(idx) = parse_index(first) else {
                return Err(cannot_create(first, cur_name, cur));
            };
            if idx >= arr.len() {
                arr.resize(idx, Bson::Null);
                arr.push(if rest.is_empty() {
                    value
                } else {
                    build_nested(rest, value)
                });
                return Ok(());
            }
            if rest.is_empty() {
                arr[idx] = value;
                Ok(())
            } else {
                set_in_value(&mut arr[idx], first, rest, value)
            }
        }
        other => Err(cannot_create(first, cur_name, other)),
    }
}

fn build_nested(parts: &[&str], value: Bson) -> Bson {
    let mut v = value;
    for p in parts.iter().rev() {
        let mut d = Document::new();
        d.insert(*p, v);
        v = Bson::Document(d);
    }
    v
}

/// Removes the value at a path (update semantics). Removing an array element sets it to null,
/// like `$unset`. Returns whether something was there.
pub fn unset_path(doc: &mut Document, path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').collect();
    let (last, parents) = parts.split_last().expect("non-empty");
    if parents.is_empty() {
        return doc.remove(*last).is_some();
    }
    let parent_path = parents.join(".");
    match get_path_mut(doc, &parent_path) {
        Some(Bson::Document(d)) => d.remove(*last).is_some(),
        Some(Bson::Array(a)) => match parse_index(last) {
            Some(i) if i < a.len() => {
                a[i] = Bson::Null;
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Removes a field and returns its value (update semantics, no null-ing of array elements:
/// array elements are not removable and yield `None`).
pub fn take_path(doc: &mut Document, path: &str) -> Option<Bson> {
    let parts: Vec<&str> = path.split('.').collect();
    let (last, parents) = parts.split_last()?;
    if parents.is_empty() {
        return doc.remove(*last);
    }
    match get_path_mut(doc, &parents.join("."))? {
        Bson::Document(d) => d.remove(*last),
        _ => None,
    }
}

/// Whether any component of the path (before the last) resolves to an array in `doc`.
pub fn path_traverses_array(doc: &Document, path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur: Option<&Bson> = doc.get(parts[0]);
    for p in &parts[1..] {
        match cur {
            Some(Bson::Array(_)) => return true,
            Some(Bson::Document(d)) => cur = d.get(*p),
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn p(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn query_traversal_through_arrays() {
        let d = doc! {"a": [{"b": 1}, {"b": 2}, {"c": 3}, 7]};
        let vals = query_values(&d, &p("a.b"));
        assert_eq!(
            vals,
            vec![Some(&Bson::Int32(1)), Some(&Bson::Int32(2)), None, None]
        );
        assert_eq!(query_values(&doc! {"a": []}, &p("a.b")), vec![None]);
        assert_eq!(
            query_values(&doc! {"a": [5, 6]}, &p("a.0")),
            vec![Some(&Bson::Int32(5))]
        );
        assert_eq!(query_values(&doc! {"a": [5, 6]}, &p("a.7")), vec![None]);
        // A numeric component indexes the array and also matches fields named "0".
        let d = doc! {"a": [{"0": "field"}, "second"]};
        let vals = query_values(&d, &p("a.0"));
        assert_eq!(
            vals,
            vec![
                Some(&Bson::Document(doc! {"0": "field"})),
                Some(&Bson::String("field".into()))
            ]
        );
        let d = doc! {"a": 5};
        assert_eq!(query_values(&d, &p("a.b")), vec![None]);
        assert_eq!(query_values(&d, &p("x")), vec![None]);
        // Leaf arrays are returned whole.
        let d = doc! {"a": {"b": [1, 2]}};
        assert_eq!(
            query_values(&d, &p("a.b")),
            vec![Some(&Bson::Array(vec![Bson::Int32(1), Bson::Int32(2)]))]
        );
        // Nested arrays are not traversed implicitly by a field name.
        let d = doc! {"a": [[{"b": 1}]]};
        assert_eq!(query_values(&d, &p("a.b")), vec![None]);
        let d = doc! {"a": [[{"b": 1}]]};
        assert_eq!(query_values(&d, &p("a.0.b")), vec![Some(&Bson::Int32(1))]);
    }

    #[test]
    fn set_creates_intermediates_and_keeps_positions() {
        let mut d = doc! {"_id": 1, "a": 1, "z": 0};
        set_path(&mut d, "a", Bson::Int32(5)).unwrap();
        set_path(&mut d, "b.c.d", Bson::Int32(2)).unwrap();
        assert_eq!(d, doc! {"_id": 1, "a": 5, "z": 0, "b": {"c": {"d": 2}}});
        let keys: Vec<_> = d.keys().cloned().collect();
        assert_eq!(keys, vec!["_id", "a", "z", "b"]);
        let mut d = doc! {"a": [1, 2]};
        set_path(&mut d, "a.4", Bson::Int32(9)).unwrap();
        assert_eq!(d, doc! {"a": [1, 2, null, null, 9]});
        set_path(&mut d, "a.0", Bson::Int32(0)).unwrap();
        assert_eq!(d, doc! {"a": [0, 2, null, null, 9]});
        let mut d = doc! {"a": [{"b": 1}]};
        set_path(&mut d, "a.0.b", Bson::Int32(3)).unwrap();
        set_path(&mut d, "a.1.c", Bson::Int32(4)).unwrap();
        assert_eq!(d, doc! {"a": [{"b": 3}, {"c": 4}]});
    }

    #[test]
    fn set_errors_when_path_not_viable() {
        let mut d = doc! {"a": 1};
        let e = set_path(&mut d, "a.b", Bson::Int32(1)).unwrap_err();
        assert_eq!(e.code, 28);
        assert_eq!(e.message, "Cannot create field 'b' in element {a: 1}");
        let mut d = doc! {"a": [1]};
        let e = set_path(&mut d, "a.b", Bson::Int32(1)).unwrap_err();
        assert_eq!(e.code, 28);
        assert_eq!(e.message, "Cannot create field 'b' in element {a: [1]}");
    }

    #[test]
    fn unset_and_get() {
        let mut d = doc! {"a": {"b": 1, "c": 2}, "arr": [1, 2, 3]};
        assert!(unset_path(&mut d, "a.b"));
        assert!(!unset_path(&mut d, "a.zz"));
        assert!(!unset_path(&mut d, "q.r"));
        assert!(unset_path(&mut d, "arr.1"));
        assert_eq!(d, doc! {"a": {"c": 2}, "arr": [1, null, 3]});
        assert_eq!(get_path(&d, "arr.2"), Some(&Bson::Int32(3)));
        assert_eq!(get_path(&d, "a.c"), Some(&Bson::Int32(2)));
        assert_eq!(get_path(&d, "a.c.d"), None);
        assert_eq!(
            get_parts(&d, &[PathPart::Field("arr".into()), PathPart::Index(0)]),
            Some(&Bson::Int32(1))
        );
        assert_eq!(
            dotted(&[PathPart::Field("a".into()), PathPart::Index(3)]),
            "a.3"
        );
        assert_eq!(parse_index("01"), None);
        assert_eq!(parse_index("10"), Some(10));
        assert!(path_traverses_array(&d, "arr.0"));
        assert!(!path_traverses_array(&d, "a.c"));
    }
}

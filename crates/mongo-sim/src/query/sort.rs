//! Sort specifications (`find` `sort`, `$sort`).

use std::cmp::Ordering;

use bson::{Bson, Document};

use super::compare::compare_values;
use super::path::query_values;
use crate::error::{CommandError, CommandResult};

/// A compiled sort specification like `{a: 1, "b.c": -1}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SortSpec {
    keys: Vec<(Vec<String>, bool)>,
    /// `{$natural: -1}`: reverse of the input (storage) order.
    natural_reverse: bool,
}

impl SortSpec {
    /// Parses a sort document. Directions must be 1 or -1 (any numeric type); `{$meta: ...}`
    /// is not supported.
    pub fn new(spec: &Document) -> CommandResult<SortSpec> {
        let mut keys = Vec::with_capacity(spec.len());
        let mut natural_reverse = false;
        for (k, v) in spec {
            if k == "$natural" {
                // Natural order is the input order; only its direction matters here.
                let d = super::expr::num_to_f64(v);
                if d == -1.0 {
                    natural_reverse = true;
                } else if d != 1.0 {
                    return Err(CommandError::new(
                        15975,
                        "$sort key ordering must be 1 (for ascending) or -1 (for descending)",
                    ));
                }
                continue;
            }
            if k.is_empty() {
                return Err(CommandError::new(
                    40352,
                    "FieldPath cannot be constructed with empty string",
                ));
            }
            if k.starts_with('$') {
                return Err(CommandError::new(
                    16410,
                    "FieldPath field names may not start with '$'.",
                ));
            }
            let asc = match v {
                Bson::Document(d) if d.contains_key("$meta") => {
                    return Err(CommandError::new(
                        17312,
                        "$meta sort is not supported by mongo-sim",
                    ))
                }
                b => {
                    let n = match b {
                        Bson::Int32(i) => *i as f64,
                        Bson::Int64(i) => *i as f64,
                        Bson::Double(d) => *d,
                        Bson::Decimal128(_) => super::expr::num_to_f64(b),
                        _ => f64::NAN,
                    };
                    if n == 1.0 {
                        true
                    } else if n == -1.0 {
                        false
                    } else {
                        return Err(CommandError::new(
                            15975,
                            "$sort key ordering must be 1 (for ascending) or -1 (for descending)",
                        ));
                    }
                }
            };
            keys.push((k.split('.').map(String::from).collect(), asc));
        }
        Ok(SortSpec {
            keys,
            natural_reverse,
        })
    }

    /// Whether the sort leaves documents in their input order.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.natural_reverse
    }

    /// The sort key of a document: per sort field, the value used for comparison (smallest
    /// element of arrays for ascending fields, largest for descending; missing is null; an
    /// empty array sorts as undefined, before null).
    pub fn sort_key(&self, doc: &Document) -> Vec<Bson> {
        self.keys
            .iter()
            .map(|(path, asc)| key_for(doc, path, !*asc))
            .collect()
    }

    /// Compares two precomputed sort keys.
    pub fn compare_keys(&self, a: &[Bson], b: &[Bson]) -> Ordering {
        for (i, (_, asc)) in self.keys.iter().enumerate() {
            let o = compare_values(&a[i], &b[i]);
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    /// Compares two documents under this sort.
    pub fn compare(&self, a: &Document, b: &Document) -> Ordering {
        for (path, asc) in &self.keys {
            let ka = key_for(a, path, !*asc);
            let kb = key_for(b, path, !*asc);
            let o = compare_values(&ka, &kb);
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    /// Stable-sorts documents (keys computed once per document).
    pub fn sort(&self, docs: Vec<Document>) -> Vec<Document> {
        let docs = if self.natural_reverse {
            docs.into_iter().rev().collect()
        } else {
            docs
        };
        if self.keys.is_empty() {
            return docs;
        }
        let mut keyed: Vec<(Vec<Bson>, Document)> =
            docs.into_iter().map(|d| (self.sort_key(&d), d)).collect();
        keyed.sort_by(|a, b| self.compare_keys(&a.0, &b.0));
        keyed.into_iter().map(|(_, d)| d).collect()
    }
}

fn key_for(doc: &Document, path: &[String], descending: bool) -> Bson {
    let vals = query_values(doc, path);
    let mut best: Option<Bson> = None;
    let mut consider = |v: Bson| {
        best = Some(match best.take() {
            None => v,
            Some(b) => {
                let o = compare_values(&v, &b);
                if (descending && o == Ordering::Greater) || (!descending && o == Ordering::Less) {
                    v
                } else {
                    b
                }
            }
        });
    };
    for v in vals {
        match v {
            None => consider(Bson::Null),
            Some(Bson::Array(a)) if a.is_empty() => consider(Bson::Undefined),
            Some(Bson::Array(a)) => {
                for e in a {
                    consider(e.clone());
                }
            }
            Some(other) => consider(other.clone()),
        }
    }
    best.unwrap_or(Bson::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn ids(docs: &[Document]) -> Vec<i32> {
        docs.iter().map(|d| d.get_i32("_id").unwrap()).collect()
    }

    #[test]
    fn mixed_types_follow_type_order() {
        let docs = vec![
            doc! {"_id": 1, "a": "x"},
            doc! {"_id": 2, "a": 5},
            doc! {"_id": 3},
            doc! {"_id": 4, "a": null},
            doc! {"_id": 5, "a": {"b": 1}},
            doc! {"_id": 6, "a": 2.5},
            doc! {"_id": 7, "a": true},
        ];
        let s = SortSpec::new(&doc! {"a": 1}).unwrap();
        // missing and null tie (stable order), then numbers, strings, objects, bools.
        assert_eq!(ids(&s.sort(docs.clone())), vec![3, 4, 6, 2, 1, 5, 7]);
        let s = SortSpec::new(&doc! {"a": -1}).unwrap();
        assert_eq!(ids(&s.sort(docs)), vec![7, 5, 1, 2, 6, 3, 4]);
    }

    #[test]
    fn arrays_use_min_for_ascending_and_max_for_descending() {
        let docs = vec![
            doc! {"_id": 1, "a": [1, 10]},
            doc! {"_id": 2, "a": [5]},
            doc! {"_id": 3, "a": 3},
            doc! {"_id": 4, "a": []},
            doc! {"_id": 5, "a": null},
        ];
        let s = SortSpec::new(&doc! {"a": 1}).unwrap();
        assert_eq!(ids(&s.sort(docs.clone())), vec![4, 5, 1, 3, 2]);
        let s = SortSpec::new(&doc! {"a": -1}).unwrap();
        assert_eq!(ids(&s.sort(docs)), vec![1, 2, 3, 5, 4]);
    }

    #[test]
    fn dotted_paths_and_compound_keys() {
        let docs = vec![
            doc! {"_id": 1, "a": {"b": 2}, "c": 1},
            doc! {"_id": 2, "a": [{"b": 9}, {"b": 0}], "c": 1},
            doc! {"_id": 3, "a": {"b": 2}, "c": 0},
        ];
        let s = SortSpec::new(&doc! {"a.b": 1, "c": -1}).unwrap();
        assert_eq!(ids(&s.sort(docs.clone())), vec![2, 1, 3]);
        assert_eq!(s.compare(&docs[0], &docs[2]), Ordering::Less);
        let s = SortSpec::new(&doc! {"a.b": -1.0, "_id": 1i64}).unwrap();
        assert_eq!(ids(&s.sort(docs)), vec![2, 1, 3]);
    }

    #[test]
    fn invalid_specs() {
        assert_eq!(SortSpec::new(&doc! {"a": 2}).unwrap_err().code, 15975);
        assert_eq!(SortSpec::new(&doc! {"a": "asc"}).unwrap_err().code, 15975);
        assert_eq!(
            SortSpec::new(&doc! {"a": {"$meta": "textScore"}})
                .unwrap_err()
                .code,
            17312
        );
        assert!(SortSpec::new(&doc! {}).unwrap().is_empty());
        assert_eq!(
            SortSpec::new(&doc! {"$natural": 2}).unwrap_err().code,
            15975
        );
    }

    #[test]
    fn natural_order() {
        let docs = vec![doc! {"_id": 2}, doc! {"_id": 1}, doc! {"_id": 3}];
        let s = SortSpec::new(&doc! {"$natural": 1}).unwrap();
        assert!(s.is_empty());
        assert_eq!(ids(&s.sort(docs.clone())), vec![2, 1, 3]);
        let s = SortSpec::new(&doc! {"$natural": -1}).unwrap();
        assert!(!s.is_empty());
        assert_eq!(ids(&s.sort(docs)), vec![3, 1, 2]);
    }
}

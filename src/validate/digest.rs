//! Digests (DESIGN §2.7): a document's digest is a 128-bit hash of its raw stored bytes; a
//! range's digest is its document count plus the sum of its document digests mod 2^128, so it
//! does not depend on the order in which the two sides return documents.
//!
//! The hash is XXH3-128 (`xxhash-rust`): it runs at memory speed (several GB/s per core), so the
//! scan is bound by the clusters, not by hashing. It is not a cryptographic hash; nobody chooses
//! the documents to collide on purpose here, and an accidental collision of two different
//! range sums is ~2^-128 per range. SHA-256 would cost ~10x the CPU for no property we need.

use std::collections::HashMap;

use bson::{Bson, Document, RawBson, RawDocument};

/// A document's digest.
pub fn document_digest(raw: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(raw)
}

/// Count and order-independent sum of the document digests of a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeDigest {
    pub count: u64,
    pub sum: u128,
}

impl RangeDigest {
    pub fn add(&mut self, digest: u128) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(digest);
    }
}

/// Equality key of an `_id`: the daemon's one key (`crate::model::id_key`), shared with apply and
/// copy.
pub use crate::model::id_key::IdKey;

/// How two versions of one document compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// Byte-identical.
    Equal,
    /// Same fields and values, in another order.
    OrderOnly,
    /// Different values (or types, or fields).
    Content,
}

/// Compares a source and a destination document.
pub fn compare_documents(source: &RawDocument, destination: &RawDocument) -> Difference {
    if source.as_bytes() == destination.as_bytes() {
        return Difference::Equal;
    }
    match (sorted_bytes(source), sorted_bytes(destination)) {
        (Some(a), Some(b)) if a == b => Difference::OrderOnly,
        _ => Difference::Content,
    }
}

/// The document with the fields of every embedded document sorted by name (array element order
/// is data and stays), as bytes.
fn sorted_bytes(raw: &RawDocument) -> Option<Vec<u8>> {
    let doc: Document = raw.try_into().ok()?;
    sorted(doc).to_vec().ok()
}

fn sorted(doc: Document) -> Document {
    let mut fields: Vec<(String, Bson)> = doc.into_iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields
        .into_iter()
        .map(|(k, v)| (k, sorted_value(v)))
        .collect()
}

fn sorted_value(v: Bson) -> Bson {
    match v {
        Bson::Document(d) => Bson::Document(sorted(d)),
        Bson::Array(items) => Bson::Array(items.into_iter().map(sorted_value).collect()),
        other => other,
    }
}

/// Per-document digests of one side of a range, in scan order.
#[derive(Debug, Default)]
pub struct RangeDocs {
    pub digest: RangeDigest,
    pub docs: Vec<(RawBson, u128)>,
    pub bytes: u64,
}

impl RangeDocs {
    pub fn push(&mut self, id: RawBson, digest: u128, bytes: usize) {
        self.digest.add(digest);
        self.bytes += bytes as u64;
        self.docs.push((id, digest));
    }
}

/// `_id`s whose documents differ between the two sides of a range, by first-check class.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Candidates {
    /// On the source only.
    pub missing: Vec<Bson>,
    /// On the destination only.
    pub extra: Vec<Bson>,
    /// On both sides with different digests.
    pub changed: Vec<Bson>,
}

impl Candidates {
    pub fn len(&self) -> usize {
        self.missing.len() + self.extra.len() + self.changed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Bson> {
        let mut all = Vec::with_capacity(self.len());
        all.extend(self.missing.iter().cloned());
        all.extend(self.extra.iter().cloned());
        all.extend(self.changed.iter().cloned());
        all
    }
}

/// The `_id`s on which the two sides of a range disagree.
pub fn candidates(source: &RangeDocs, destination: &RangeDocs) -> Candidates {
    let mut src: HashMap<IdKey, (&RawBson, u128)> = source
        .docs
        .iter()
        .map(|(id, d)| (IdKey::of(id.as_raw_bson_ref()), (id, *d)))
        .collect();
    let mut out = Candidates::default();
    for (id, digest) in &destination.docs {
        match src.remove(&IdKey::of(id.as_raw_bson_ref())) {
            None => out.extra.push(to_bson(id)),
            Some((_, d)) if d != *digest => out.changed.push(to_bson(id)),
            Some(_) => {}
        }
    }
    // What is left is on the source only; report it in scan order.
    for (id, _) in &source.docs {
        if src.contains_key(&IdKey::of(id.as_raw_bson_ref())) {
            out.missing.push(to_bson(id));
        }
    }
    out
}

fn to_bson(id: &RawBson) -> Bson {
    Bson::try_from(id.clone()).unwrap_or(Bson::Null)
}

#[cfg(test)]
mod tests {
    use bson::{rawdoc, RawDocumentBuf};

    use super::*;

    fn range(docs: &[RawDocumentBuf]) -> RangeDocs {
        let mut r = RangeDocs::default();
        for d in docs {
            let id = RawBson::from(d.get("_id").unwrap().unwrap());
            r.push(id, document_digest(d.as_bytes()), d.as_bytes().len());
        }
        r
    }

    #[test]
    fn range_digest_ignores_order_and_sees_every_change() {
        let a = rawdoc! {"_id": 1, "x": 1};
        let b = rawdoc! {"_id": 2, "x": 2};
        let forward = range(&[a.clone(), b.clone()]);
        let backward = range(&[b.clone(), a.clone()]);
        assert_eq!(forward.digest, backward.digest);
        let changed = range(&[a.clone(), rawdoc! {"_id": 2, "x": 3}]);
        assert_ne!(forward.digest, changed.digest);
        let fewer = range(&[a]);
        assert_ne!(forward.digest, fewer.digest);
        // A type change is a change: 2 (int32) vs 2 (int64).
        let retyped = range(&[b, rawdoc! {"_id": 1, "x": 1i64}]);
        assert_ne!(forward.digest, retyped.digest);
    }

    #[test]
    fn sum_wraps_modulo_2_pow_128() {
        let mut d = RangeDigest::default();
        d.add(u128::MAX);
        d.add(2);
        assert_eq!(d, RangeDigest { count: 2, sum: 1 });
    }

    #[test]
    fn numeric_ids_of_equal_value_share_a_key() {
        let k = |b: Bson| IdKey::of_bson(&b);
        assert_eq!(k(Bson::Int32(7)), k(Bson::Int64(7)));
        assert_eq!(k(Bson::Int32(7)), k(Bson::Double(7.0)));
        assert_eq!(k(Bson::Double(0.0)), k(Bson::Double(-0.0)));
        assert_ne!(k(Bson::Double(7.5)), k(Bson::Int32(7)));
        assert_ne!(k(Bson::Int32(7)), k(Bson::String("7".into())));
        // Large int64s stay distinct (no f64 rounding).
        assert_ne!(k(Bson::Int64((1 << 53) + 1)), k(Bson::Int64(1 << 53)));
        let oid = bson::oid::ObjectId::new();
        assert_eq!(k(Bson::ObjectId(oid)), k(Bson::ObjectId(oid)));
    }

    #[test]
    fn candidates_are_classified() {
        let src = range(&[
            rawdoc! {"_id": 1, "v": 1},
            rawdoc! {"_id": 2, "v": 2},
            rawdoc! {"_id": 3, "v": 3},
        ]);
        let dst = range(&[
            rawdoc! {"_id": 1, "v": 1},
            rawdoc! {"_id": 3i64, "v": 30},
            rawdoc! {"_id": "x"},
        ]);
        let c = candidates(&src, &dst);
        assert_eq!(c.missing, vec![Bson::Int32(2)]);
        assert_eq!(c.extra, vec![Bson::String("x".into())]);
        assert_eq!(c.changed, vec![Bson::Int64(3)]);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn field_order_is_its_own_class() {
        let a = rawdoc! {"_id": 1, "a": 1, "b": {"c": 1, "d": [ {"e": 1, "f": 2} ]}};
        let reordered = rawdoc! {"_id": 1, "b": {"d": [ {"f": 2, "e": 1} ], "c": 1}, "a": 1};
        let changed = rawdoc! {"_id": 1, "a": 2, "b": {"c": 1, "d": [ {"e": 1, "f": 2} ]}};
        let array_order = rawdoc! {"_id": 1, "a": 1, "b": {"c": 1, "d": [ {"e": 1, "f": 2}, 1 ]}};
        assert_eq!(compare_documents(&a, &a.clone()), Difference::Equal);
        assert_eq!(compare_documents(&a, &reordered), Difference::OrderOnly);
        assert_eq!(compare_documents(&a, &changed), Difference::Content);
        assert_eq!(compare_documents(&a, &array_order), Difference::Content);
    }
}

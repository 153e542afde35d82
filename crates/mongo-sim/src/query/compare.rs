//! BSON comparison in MongoDB's canonical type order (`BSONElement::woCompare` /
//! `compareElementValues` with the simple collation).
//!
//! Canonical type ranks follow the server's `canonicalizeBSONType`, shifted by one so that
//! they fit in a `u8`: MinKey 0, Undefined (and "missing" in aggregation) 1, Null 6,
//! numbers 11, String/Symbol 16, Object 21, Array 26, BinData 31, ObjectId 36, Bool 41,
//! Date 46, Timestamp 48, Regex 51, DBPointer 56, JavaScript 61, JavaScriptWithScope 66,
//! MaxKey 128.
//!
//! Numbers of all four types compare by exact numeric value (an Int64 near 2^63 against a
//! Double, or a Decimal128 against a Double, is compared exactly, not through a lossy cast),
//! NaN equals NaN and is smaller than every other number, and -0 equals 0.

use std::cmp::Ordering;

use bson::{Bson, Decimal128, Document};

/// Rank of missing values (aggregation's "missing"), equal to Undefined's rank.
pub const MISSING_RANK: u8 = 1;
/// Rank shared by all numeric types.
pub const NUMBER_RANK: u8 = 11;

/// The canonical type rank of a value (see the module docs for the table).
pub fn canonical_type_rank(b: &Bson) -> u8 {
    match b {
        Bson::MinKey => 0,
        Bson::Undefined => 1,
        Bson::Null => 6,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => NUMBER_RANK,
        Bson::String(_) | Bson::Symbol(_) => 16,
        Bson::Document(_) => 21,
        Bson::Array(_) => 26,
        Bson::Binary(_) => 31,
        Bson::ObjectId(_) => 36,
        Bson::Boolean(_) => 41,
        Bson::DateTime(_) => 46,
        Bson::Timestamp(_) => 48,
        Bson::RegularExpression(_) => 51,
        Bson::DbPointer(_) => 56,
        Bson::JavaScriptCode(_) => 61,
        Bson::JavaScriptCodeWithScope(_) => 66,
        Bson::MaxKey => 128,
    }
}

/// Total order over BSON values, as the server sorts and compares them.
pub fn compare_values(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (canonical_type_rank(a), canonical_type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::MinKey, _) | (Bson::MaxKey, _) | (Bson::Null, _) | (Bson::Undefined, _) => {
            Ordering::Equal
        }
        _ if ra == NUMBER_RANK => compare_numbers(a, b),
        (Bson::String(x) | Bson::Symbol(x), Bson::String(y) | Bson::Symbol(y)) => {
            crate::collation::compare_strings(x, y)
        }
        (Bson::Document(x), Bson::Document(y)) => compare_documents(x, y),
        (Bson::Array(x), Bson::Array(y)) => compare_arrays(x, y),
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then_with(|| u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then_with(|| x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.timestamp_millis().cmp(&y.timestamp_millis()),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            (x.time, x.increment).cmp(&(y.time, y.increment))
        }
        (Bson::RegularExpression(x), Bson::RegularExpression(y)) => x
            .pattern
            .as_str()
            .as_bytes()
            .cmp(y.pattern.as_str().as_bytes())
            .then_with(|| {
                x.options
                    .as_str()
                    .as_bytes()
                    .cmp(y.options.as_str().as_bytes())
            }),
        (Bson::DbPointer(x), Bson::DbPointer(y)) => {
            // The fields of DbPointer are private in the bson crate; compare the debug
            // rendering (namespace, then id), which preserves equality. DBPointer is deprecated.
            format!("{x:?}").cmp(&format!("{y:?}"))
        }
        (Bson::JavaScriptCode(x), Bson::JavaScriptCode(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Bson::JavaScriptCodeWithScope(x), Bson::JavaScriptCodeWithScope(y)) => x
            .code
            .as_bytes()
            .cmp(y.code.as_bytes())
            .then_with(|| compare_documents(&x.scope, &y.scope)),
        _ => Ordering::Equal,
    }
}

/// Compares two optional values where `None` is aggregation's "missing" (ranked with
/// Undefined, below Null).
pub fn compare_optional(a: Option<&Bson>, b: Option<&Bson>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(y)) => {
            let r = canonical_type_rank(y);
            MISSING_RANK.cmp(&r)
        }
        (Some(x), None) => canonical_type_rank(x).cmp(&MISSING_RANK),
        (Some(x), Some(y)) => compare_values(x, y),
    }
}

/// Documents compare field by field: canonical type, then field name, then value; a prefix
/// is smaller.
pub fn compare_documents(a: &Document, b: &Document) -> Ordering {
    let mut ia = a.iter();
    let mut ib = b.iter();
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some((ka, va)), Some((kb, vb))) => {
                let o = canonical_type_rank(va)
                    .cmp(&canonical_type_rank(vb))
                    .then_with(|| ka.as_bytes().cmp(kb.as_bytes()))
                    .then_with(|| compare_values(va, vb));
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

/// Arrays compare element by element, then by length.
pub fn compare_arrays(a: &[Bson], b: &[Bson]) -> Ordering {
    for (x, y) in a.iter().zip(b.iter()) {
        let o = compare_values(x, y);
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// Equality under [`compare_values`] (so `1 == 1.0 == 1i64`).
pub fn values_equal(a: &Bson, b: &Bson) -> bool {
    compare_values(a, b) == Ordering::Equal
}

/// [`values_equal`] under the simple collation, whatever a command installed (the `_id`
/// immutability check).
pub fn values_equal_simple(a: &Bson, b: &Bson) -> bool {
    let _simple = crate::collation::install(None);
    values_equal(a, b)
}

/// Exact ("binary") equality: same types, same bytes, same field order, recursively.
/// `1` vs `1.0` differ; `NaN` equals a `NaN` with the same bits.
pub fn binary_equal(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::Double(x), Bson::Double(y)) => x.to_bits() == y.to_bits(),
        (Bson::Document(x), Bson::Document(y)) => documents_binary_equal(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| binary_equal(p, q))
        }
        (Bson::JavaScriptCodeWithScope(x), Bson::JavaScriptCodeWithScope(y)) => {
            x.code == y.code && documents_binary_equal(&x.scope, &y.scope)
        }
        _ => std::mem::discriminant(a) == std::mem::discriminant(b) && a == b,
    }
}

/// Exact equality of documents, including field order.
pub fn documents_binary_equal(a: &Document, b: &Document) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((ka, va), (kb, vb))| ka == kb && binary_equal(va, vb))
}

/// A `_id` (or unique index key) usable as a `BTreeMap` key, ordered by [`compare_values`].
#[derive(Clone, Debug)]
pub struct IdKey(pub Bson);

impl PartialEq for IdKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for IdKey {}
impl PartialOrd for IdKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for IdKey {
    /// Binary string order whatever collation a command installed: store keys of a collated
    /// collection are already collation keys (`Collection::id_key`).
    fn cmp(&self, other: &Self) -> Ordering {
        // The common `_id` kinds first, as `compare_values` orders them (integers by value,
        // strings and ObjectIds by their bytes): every lookup of the documents' map compares
        // a key with ~20 others, and installing the simple collation costs a thread-local
        // swap per comparison.
        match (&self.0, &other.0) {
            (Bson::Int32(a), Bson::Int32(b)) => return a.cmp(b),
            (Bson::Int64(a), Bson::Int64(b)) => return a.cmp(b),
            (Bson::Int32(a), Bson::Int64(b)) => return i64::from(*a).cmp(b),
            (Bson::Int64(a), Bson::Int32(b)) => return a.cmp(&i64::from(*b)),
            (Bson::String(a), Bson::String(b)) => return a.as_bytes().cmp(b.as_bytes()),
            (Bson::ObjectId(a), Bson::ObjectId(b)) => return a.bytes().cmp(&b.bytes()),
            _ => {}
        }
        let _simple = crate::collation::install(None);
        compare_values(&self.0, &other.0)
    }
}

/// A map key ordered by `compare_values` under the installed collation (`$group` keys):
/// unlike [`IdKey`], "Bob" and "bob" are one key under a strength-2 collation.
#[derive(Clone, Debug)]
pub struct CmpKey(pub Bson);

impl PartialEq for CmpKey {
    fn eq(&self, other: &Self) -> bool {
        compare_values(&self.0, &other.0) == Ordering::Equal
    }
}
impl Eq for CmpKey {}
impl PartialOrd for CmpKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for CmpKey {
    fn cmp(&self, other: &Self) -> Ordering {
        compare_values(&self.0, &other.0)
    }
}

/// The value an ascending (`min`) or descending (`max`) sort uses for an array: its smallest
/// or largest element; an empty array sorts as `undefined` (before null).
pub fn sort_key_for_array(arr: &[Bson], descending: bool) -> Bson {
    let mut best: Option<&Bson> = None;
    for e in arr {
        best = match best {
            None => Some(e),
            Some(b) => {
                let o = compare_values(e, b);
                if (descending && o == Ordering::Greater) || (!descending && o == Ordering::Less) {
                    Some(e)
                } else {
                    Some(b)
                }
            }
        };
    }
    best.cloned().unwrap_or(Bson::Undefined)
}

// ---------------------------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------------------------

/// A decoded Decimal128.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DecimalValue {
    NaN,
    Inf {
        negative: bool,
    },
    /// `(-1)^negative * coefficient * 10^exponent`
    Finite {
        negative: bool,
        coefficient: u128,
        exponent: i32,
    },
}

/// Decodes the BID encoding of a Decimal128 (non-canonical coefficients decode as zero, as in
/// the IEEE 754-2008 spec).
pub fn decode_decimal(d: &Decimal128) -> DecimalValue {
    let bits = u128::from_le_bytes(d.bytes());
    let negative = bits >> 127 == 1;
    let comb = (bits >> 122) & 0x1f;
    if comb == 0x1f {
        return DecimalValue::NaN;
    }
    if comb == 0x1e {
        return DecimalValue::Inf { negative };
    }
    let (exp_bits, coefficient) = if (bits >> 125) & 0b11 == 0b11 {
        // The coefficient would be >= 2^113 > 10^34 - 1: non-canonical, hence zero.
        (((bits >> 111) & 0x3fff) as i32, 0u128)
    } else {
        let c = bits & ((1u128 << 113) - 1);
        let c = if c > 9_999_999_999_999_999_999_999_999_999_999u128 {
            0
        } else {
            c
        };
        (((bits >> 113) & 0x3fff) as i32, c)
    };
    DecimalValue::Finite {
        negative,
        coefficient,
        exponent: exp_bits - 6176,
    }
}

/// Whether a numeric value is NaN (Double or Decimal128).
pub fn is_nan(b: &Bson) -> bool {
    match b {
        Bson::Double(d) => d.is_nan(),
        Bson::Decimal128(d) => matches!(decode_decimal(d), DecimalValue::NaN),
        _ => false,
    }
}

/// Exact value of a finite, non-zero magnitude: `mant * 2^pow2 * 5^pow5`.
#[derive(Debug, Clone)]
struct Exact {
    mant: u128,
    pow2: i64,
    pow5: i64,
}

enum NumClass {
    NaN,
    NegInf,
    PosInf,
    Zero,
    Finite { negative: bool, exact: Exact },
}

fn classify(b: &Bson) -> NumClass {
    match b {
        Bson::Int32(i) => classify_i64(*i as i64),
        Bson::Int64(i) => classify_i64(*i),
        Bson::Double(d) => classify_f64(*d),
        Bson::Decimal128(d) => match decode_decimal(d) {
            DecimalValue::NaN => NumClass::NaN,
            DecimalValue::Inf { negative: true } => NumClass::NegInf,
            DecimalValue::Inf { negative: false } => NumClass::PosInf,
            DecimalValue::Finite {
                negative,
                coefficient,
                exponent,
            } => {
                if coefficient == 0 {
                    NumClass::Zero
                } else {
                    NumClass::Finite {
                        negative,
                        exact: Exact {
                            mant: coefficient,
                            pow2: exponent as i64,
                            pow5: exponent as i64,
                        },
                    }
                }
            }
        },
        _ => NumClass::NaN,
    }
}

fn classify_i64(i: i64) -> NumClass {
    if i == 0 {
        NumClass::Zero
    } else {
        NumClass::Finite {
            negative: i < 0,
            exact: Exact {
                mant: i.unsigned_abs() as u128,
                pow2: 0,
                pow5: 0,
            },
        }
    }
}

fn classify_f64(d: f64) -> NumClass {
    if d.is_nan() {
        return NumClass::NaN;
    }
    if d.is_infinite() {
        return if d < 0.0 {
            NumClass::NegInf
        } else {
            NumClass::PosInf
        };
    }
    if d == 0.0 {
        return NumClass::Zero;
    }
    let bits = d.to_bits();
    let negative = bits >> 63 == 1;
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1u64 << 52) - 1);
    let (mant, pow2) = if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    };
    NumClass::Finite {
        negative,
        exact: Exact {
            mant: mant as u128,
            pow2,
            pow5: 0,
        },
    }
}

/// Compares two numeric BSON values by exact value.
pub fn compare_numbers(a: &Bson, b: &Bson) -> Ordering {
    // Fast paths for the overwhelmingly common cases.
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => return x.cmp(y),
        (Bson::Int64(x), Bson::Int64(y)) => return x.cmp(y),
        (Bson::Int32(x), Bson::Int64(y)) => return (*x as i64).cmp(y),
        (Bson::Int64(x), Bson::Int32(y)) => return x.cmp(&(*y as i64)),
        (Bson::Double(x), Bson::Double(y)) if !x.is_nan() && !y.is_nan() => {
            return x.partial_cmp(y).unwrap_or(Ordering::Equal)
        }
        (Bson::Int32(x), Bson::Double(y)) if !y.is_nan() => {
            return (*x as f64).partial_cmp(y).unwrap_or(Ordering::Equal)
        }
        (Bson::Double(x), Bson::Int32(y)) if !x.is_nan() => {
            return x.partial_cmp(&(*y as f64)).unwrap_or(Ordering::Equal)
        }
        _ => {}
    }
    let (ca, cb) = (classify(a), classify(b));
    fn order(c: &NumClass) -> i8 {
        match c {
            NumClass::NaN => 0,
            NumClass::NegInf => 1,
            NumClass::Finite { negative: true, .. } => 2,
            NumClass::Zero => 3,
            NumClass::Finite {
                negative: false, ..
            } => 4,
            NumClass::PosInf => 5,
        }
    }
    let (oa, ob) = (order(&ca), order(&cb));
    if oa != ob {
        return oa.cmp(&ob);
    }
    match (ca, cb) {
        (
            NumClass::Finite {
                negative, exact: x, ..
            },
            NumClass::Finite { exact: y, .. },
        ) => {
            let o = compare_exact(&x, &y);
            if negative {
                o.reverse()
            } else {
                o
            }
        }
        _ => Ordering::Equal,
    }
}

fn compare_exact(a: &Exact, b: &Exact) -> Ordering {
    // Quick magnitude estimate: log2(value) ~ bits(mant) + pow2 + pow5 * log2(5).
    let est = |e: &Exact| -> f64 {
        (128 - e.mant.leading_zeros()) as f64 + e.pow2 as f64 + e.pow5 as f64 * 5f64.log2()
    };
    let (ea, eb) = (est(a), est(b));
    if ea > eb + 2.0 {
        return Ordering::Greater;
    }
    if eb > ea + 2.0 {
        return Ordering::Less;
    }
    // Exact path: scale both to common powers of 5 and 2 using big integers.
    let p5 = a.pow5.min(b.pow5);
    let p2 = a.pow2.min(b.pow2);
    let mut x = BigUint::from_u128(a.mant);
    x.mul_pow5((a.pow5 - p5) as u64);
    x.shl((a.pow2 - p2) as u64);
    let mut y = BigUint::from_u128(b.mant);
    y.mul_pow5((b.pow5 - p5) as u64);
    y.shl((b.pow2 - p2) as u64);
    x.cmp_big(&y)
}

/// Minimal unsigned big integer (little-endian u32 limbs) for exact numeric comparison.
struct BigUint {
    limbs: Vec<u32>,
}

impl BigUint {
    fn from_u128(v: u128) -> Self {
        let mut limbs = Vec::with_capacity(4);
        let mut v = v;
        while v != 0 {
            limbs.push(v as u32);
            v >>= 32;
        }
        BigUint { limbs }
    }

    fn mul_small(&mut self, m: u32) {
        let mut carry: u64 = 0;
        for l in self.limbs.iter_mut() {
            let p = (*l as u64) * (m as u64) + carry;
            *l = p as u32;
            carry = p >> 32;
        }
        if carry != 0 {
            self.limbs.push(carry as u32);
        }
    }

    fn mul_pow5(&mut self, mut n: u64) {
        const P13: u32 = 1_220_703_125; // 5^13
        while n >= 13 {
            self.mul_small(P13);
            n -= 13;
        }
        if n > 0 {
            self.mul_small(5u32.pow(n as u32));
        }
    }

    fn shl(&mut self, n: u64) {
        let words = (n / 32) as usize;
        let bits = (n % 32) as u32;
        if bits > 0 {
            let mut carry = 0u32;
            for l in self.limbs.iter_mut() {
                let nv = (*l << bits) | carry;
                carry = *l >> (32 - bits);
                *l = nv;
            }
            if carry != 0 {
                self.limbs.push(carry);
            }
        }
        if words > 0 {
            let mut v = vec![0u32; words];
            v.extend_from_slice(&self.limbs);
            self.limbs = v;
        }
    }

    fn cmp_big(&self, other: &Self) -> Ordering {
        let trim = |v: &[u32]| -> usize {
            let mut n = v.len();
            while n > 0 && v[n - 1] == 0 {
                n -= 1;
            }
            n
        };
        let (la, lb) = (trim(&self.limbs), trim(&other.limbs));
        if la != lb {
            return la.cmp(&lb);
        }
        for i in (0..la).rev() {
            let o = self.limbs[i].cmp(&other.limbs[i]);
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }
}

/// Name of a value's BSON type as `$type` reports it ("double", "string", ...).
pub fn type_name(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::Undefined => "undefined",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Null => "null",
        Bson::RegularExpression(_) => "regex",
        Bson::DbPointer(_) => "dbPointer",
        Bson::JavaScriptCode(_) => "javascript",
        Bson::Symbol(_) => "symbol",
        Bson::JavaScriptCodeWithScope(_) => "javascriptWithScope",
        Bson::Int32(_) => "int",
        Bson::Timestamp(_) => "timestamp",
        Bson::Int64(_) => "long",
        Bson::Decimal128(_) => "decimal",
        Bson::MinKey => "minKey",
        Bson::MaxKey => "maxKey",
    }
}

/// The BSON element type number of a value.
pub fn type_number(b: &Bson) -> i32 {
    match b {
        Bson::Double(_) => 1,
        Bson::String(_) => 2,
        Bson::Document(_) => 3,
        Bson::Array(_) => 4,
        Bson::Binary(_) => 5,
        Bson::Undefined => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Null => 10,
        Bson::RegularExpression(_) => 11,
        Bson::DbPointer(_) => 12,
        Bson::JavaScriptCode(_) => 13,
        Bson::Symbol(_) => 14,
        Bson::JavaScriptCodeWithScope(_) => 15,
        Bson::Int32(_) => 16,
        Bson::Timestamp(_) => 17,
        Bson::Int64(_) => 18,
        Bson::Decimal128(_) => 19,
        Bson::MinKey => -1,
        Bson::MaxKey => 127,
    }
}

/// Whether the value is one of the four numeric types.
pub fn is_number(b: &Bson) -> bool {
    matches!(
        b,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_)
    )
}

/// Size in bytes of a value's BSON encoding (without type byte and field name).
pub fn bson_value_size(b: &Bson) -> usize {
    match b {
        Bson::Double(_) | Bson::DateTime(_) | Bson::Timestamp(_) | Bson::Int64(_) => 8,
        Bson::String(s) | Bson::JavaScriptCode(s) | Bson::Symbol(s) => 4 + s.len() + 1,
        Bson::Document(d) => document_bson_size(d),
        Bson::Array(a) => array_bson_size(a),
        Bson::Binary(bin) => {
            let old = matches!(bin.subtype, bson::spec::BinarySubtype::BinaryOld);
            4 + 1 + bin.bytes.len() + if old { 4 } else { 0 }
        }
        Bson::Undefined | Bson::Null | Bson::MinKey | Bson::MaxKey => 0,
        Bson::ObjectId(_) => 12,
        Bson::Boolean(_) => 1,
        Bson::RegularExpression(r) => r.pattern.as_str().len() + 1 + r.options.as_str().len() + 1,
        // Namespace length is not observable (private field); DBPointer is deprecated.
        Bson::DbPointer(_) => 4 + 1 + 12,
        Bson::JavaScriptCodeWithScope(c) => 4 + 4 + c.code.len() + 1 + document_bson_size(&c.scope),
        Bson::Int32(_) => 4,
        Bson::Decimal128(_) => 16,
    }
}

/// Size of a document's BSON encoding.
pub fn document_bson_size(d: &Document) -> usize {
    5 + d
        .iter()
        .map(|(k, v)| 1 + k.len() + 1 + bson_value_size(v))
        .sum::<usize>()
}

/// Size of an array's BSON encoding (keys "0", "1", ...).
pub fn array_bson_size(a: &[Bson]) -> usize {
    5 + a
        .iter()
        .enumerate()
        .map(|(i, v)| 1 + decimal_digits(i) + 1 + bson_value_size(v))
        .sum::<usize>()
}

pub(crate) fn decimal_digits(mut i: usize) -> usize {
    let mut n = 1;
    while i >= 10 {
        i /= 10;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Regex, Timestamp};
    use std::str::FromStr;

    fn dec(s: &str) -> Bson {
        Bson::Decimal128(Decimal128::from_str(s).unwrap())
    }

    fn regex(p: &str, o: &str) -> Bson {
        Bson::RegularExpression(Regex {
            pattern: p.to_string().try_into().unwrap(),
            options: o.to_string().try_into().unwrap(),
        })
    }

    #[test]
    fn type_order_table() {
        let ordered = vec![
            Bson::MinKey,
            Bson::Undefined,
            Bson::Null,
            Bson::Int32(5),
            Bson::String("a".into()),
            Bson::Document(doc! {"a": 1}),
            Bson::Array(vec![Bson::Int32(1)]),
            Bson::Binary(Binary {
                subtype: BinarySubtype::Generic,
                bytes: vec![1],
            }),
            Bson::ObjectId(ObjectId::from_bytes([0; 12])),
            Bson::Boolean(false),
            Bson::DateTime(bson::DateTime::from_millis(0)),
            Bson::Timestamp(Timestamp {
                time: 1,
                increment: 1,
            }),
            regex("a", ""),
            Bson::JavaScriptCode("x".into()),
            Bson::MaxKey,
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(compare_values(a, b), i.cmp(&j), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn numbers_compare_across_types() {
        assert!(values_equal(&Bson::Int32(1), &Bson::Double(1.0)));
        assert!(values_equal(&Bson::Int64(1), &Bson::Double(1.0)));
        assert!(values_equal(&Bson::Int64(1), &dec("1.0")));
        assert!(values_equal(&Bson::Double(0.5), &dec("0.50")));
        assert!(values_equal(&Bson::Double(-0.0), &Bson::Int32(0)));
        assert_eq!(
            compare_values(&Bson::Int32(2), &Bson::Double(1.5)),
            Ordering::Greater
        );
        // 0.1 as a double is slightly above the decimal 0.1.
        assert_eq!(
            compare_values(&Bson::Double(0.1), &dec("0.1")),
            Ordering::Greater
        );
        // i64::MAX vs 2^63 as a double: exact comparison.
        assert_eq!(
            compare_values(
                &Bson::Int64(i64::MAX),
                &Bson::Double(9_223_372_036_854_775_808.0)
            ),
            Ordering::Less
        );
        assert_eq!(
            compare_values(&Bson::Int64(i64::MAX - 1), &Bson::Int64(i64::MAX)),
            Ordering::Less
        );
        // NaN is smallest among numbers and equals itself.
        assert_eq!(
            compare_values(&Bson::Double(f64::NAN), &Bson::Double(f64::NEG_INFINITY)),
            Ordering::Less
        );
        assert!(values_equal(&Bson::Double(f64::NAN), &dec("NaN")));
        assert_eq!(
            compare_values(&dec("-Infinity"), &Bson::Int64(i64::MIN)),
            Ordering::Less
        );
        assert!(values_equal(&dec("Infinity"), &Bson::Double(f64::INFINITY)));
        assert_eq!(
            compare_values(&dec("1E+400"), &Bson::Double(f64::MAX)),
            Ordering::Greater
        );
        assert_eq!(
            compare_values(&dec("-1E-400"), &Bson::Double(0.0)),
            Ordering::Less
        );
        // Numbers sort before strings regardless of value.
        assert_eq!(
            compare_values(&Bson::Double(f64::INFINITY), &Bson::String(String::new())),
            Ordering::Less
        );
    }

    #[test]
    fn strings_bytes_and_symbols() {
        assert_eq!(
            compare_values(&Bson::String("B".into()), &Bson::String("a".into())),
            Ordering::Less
        );
        assert_eq!(
            compare_values(&Bson::String("ab".into()), &Bson::String("a".into())),
            Ordering::Greater
        );
        assert!(values_equal(
            &Bson::Symbol("x".into()),
            &Bson::String("x".into())
        ));
    }

    #[test]
    fn documents_compare_field_by_field() {
        let a = Bson::Document(doc! {"a": 1, "b": 2});
        let b = Bson::Document(doc! {"b": 2, "a": 1});
        assert!(!values_equal(&a, &b));
        assert_eq!(compare_values(&a, &b), Ordering::Less);
        assert!(values_equal(
            &Bson::Document(doc! {"a": 1}),
            &Bson::Document(doc! {"a": 1.0})
        ));
        // Type rank of the value is compared before the field name.
        assert_eq!(
            compare_values(
                &Bson::Document(doc! {"z": 1}),
                &Bson::Document(doc! {"a": "x"})
            ),
            Ordering::Less
        );
        // Prefix is smaller.
        assert_eq!(
            compare_values(
                &Bson::Document(doc! {"a": 1}),
                &Bson::Document(doc! {"a": 1, "b": 0})
            ),
            Ordering::Less
        );
    }

    #[test]
    fn arrays_and_bindata() {
        let a = Bson::Array(vec![Bson::Int32(1), Bson::Int32(2)]);
        let b = Bson::Array(vec![Bson::Int32(1), Bson::Int32(3)]);
        let c = Bson::Array(vec![Bson::Int32(1)]);
        assert_eq!(compare_values(&a, &b), Ordering::Less);
        assert_eq!(compare_values(&c, &a), Ordering::Less);
        let bin = |st: BinarySubtype, bytes: Vec<u8>| Bson::Binary(Binary { subtype: st, bytes });
        // Length first, then subtype, then bytes.
        assert_eq!(
            compare_values(
                &bin(BinarySubtype::Generic, vec![9, 9]),
                &bin(BinarySubtype::Uuid, vec![1])
            ),
            Ordering::Greater
        );
        assert_eq!(
            compare_values(
                &bin(BinarySubtype::Uuid, vec![1]),
                &bin(BinarySubtype::Generic, vec![9])
            ),
            Ordering::Greater
        );
        assert_eq!(
            compare_values(
                &bin(BinarySubtype::Generic, vec![1, 2]),
                &bin(BinarySubtype::Generic, vec![1, 3])
            ),
            Ordering::Less
        );
    }

    #[test]
    fn misc_types() {
        let d = |ms| Bson::DateTime(bson::DateTime::from_millis(ms));
        assert_eq!(compare_values(&d(-5), &d(3)), Ordering::Less);
        let ts = |t, i| {
            Bson::Timestamp(Timestamp {
                time: t,
                increment: i,
            })
        };
        assert_eq!(compare_values(&ts(1, 5), &ts(2, 0)), Ordering::Less);
        assert_eq!(
            compare_values(&ts(u32::MAX, 0), &ts(1, 0)),
            Ordering::Greater
        );
        assert_eq!(
            compare_values(&regex("a", "i"), &regex("a", "")),
            Ordering::Greater
        );
        assert_eq!(
            compare_values(&Bson::Boolean(false), &Bson::Boolean(true)),
            Ordering::Less
        );
    }

    #[test]
    fn id_key_in_btreemap() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(IdKey(Bson::Int32(1)), "a");
        m.insert(IdKey(Bson::Double(1.0)), "b");
        m.insert(IdKey(Bson::String("x".into())), "c");
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(&IdKey(Bson::Int64(1))), Some(&"b"));
        let keys: Vec<_> = m.keys().map(|k| k.0.clone()).collect();
        assert_eq!(keys[1], Bson::String("x".into()));
    }

    #[test]
    fn id_key_order_is_compare_values_order() {
        let values = [
            Bson::Int32(i32::MIN),
            Bson::Int32(-1),
            Bson::Int32(7),
            Bson::Int64(i64::MIN),
            Bson::Int64(-1),
            Bson::Int64(7),
            Bson::Int64(1 << 40),
            Bson::Double(7.0),
            Bson::String(String::new()),
            Bson::String("Bob".into()),
            Bson::String("bob".into()),
            Bson::String("é".into()),
            Bson::Symbol("bob".into()),
            Bson::ObjectId(bson::oid::ObjectId::from_bytes([0; 12])),
            Bson::ObjectId(bson::oid::ObjectId::from_bytes([1; 12])),
            Bson::Null,
        ];
        // Under an installed collation too: `_id` keys compare binary whatever is installed.
        let c = crate::collation::parse(&doc! {"locale": "en", "strength": 2})
            .unwrap()
            .unwrap();
        let _installed = crate::collation::install(Some(c));
        for a in &values {
            for b in &values {
                let expected = {
                    let _simple = crate::collation::install(None);
                    compare_values(a, b)
                };
                assert_eq!(
                    IdKey(a.clone()).cmp(&IdKey(b.clone())),
                    expected,
                    "{a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn binary_equality_is_exact() {
        assert!(!binary_equal(&Bson::Int32(1), &Bson::Double(1.0)));
        assert!(binary_equal(
            &Bson::Document(doc! {"a": [1, {"b": 2.5}]}),
            &Bson::Document(doc! {"a": [1, {"b": 2.5}]})
        ));
        assert!(!binary_equal(
            &Bson::Document(doc! {"a": 1, "b": 1}),
            &Bson::Document(doc! {"b": 1, "a": 1})
        ));
    }

    #[test]
    fn array_sort_keys() {
        let arr = vec![Bson::Int32(3), Bson::String("a".into()), Bson::Int32(1)];
        assert_eq!(sort_key_for_array(&arr, false), Bson::Int32(1));
        assert_eq!(sort_key_for_array(&arr, true), Bson::String("a".into()));
        assert_eq!(sort_key_for_array(&[], false), Bson::Undefined);
    }

    #[test]
    fn bson_sizes_match_encoding() {
        let d = doc! {"a": 1, "b": "xyz", "c": [1.5, {"d": null}], "e": true, "f": 5i64};
        assert_eq!(document_bson_size(&d), d.to_vec().unwrap().len());
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn leaf() -> impl Strategy<Value = Bson> {
            prop_oneof![
                Just(Bson::Null),
                Just(Bson::MinKey),
                Just(Bson::MaxKey),
                Just(Bson::Undefined),
                any::<i32>().prop_map(Bson::Int32),
                (-3i32..3).prop_map(Bson::Int32),
                any::<i64>().prop_map(Bson::Int64),
                (-3i64..3).prop_map(Bson::Int64),
                any::<f64>().prop_map(Bson::Double),
                (-6i32..6).prop_map(|i| Bson::Double(i as f64 / 2.0)),
                Just(Bson::Double(f64::NAN)),
                Just(Bson::Double(9_223_372_036_854_775_808.0)),
                Just(Bson::Int64(i64::MAX)),
                (-300i64..300, -3i32..3).prop_map(|(c, e)| Bson::Decimal128(
                    Decimal128::from_str(&format!("{c}E{e}")).unwrap()
                )),
                Just(Bson::Decimal128(Decimal128::from_str("NaN").unwrap())),
                Just(Bson::Decimal128(Decimal128::from_str("-Infinity").unwrap())),
                "[a-c]{0,3}".prop_map(Bson::String),
                "[a-c]{0,2}".prop_map(Bson::Symbol),
                any::<bool>().prop_map(Bson::Boolean),
                (-5i64..5).prop_map(|m| Bson::DateTime(bson::DateTime::from_millis(m))),
            ]
        }

        fn value() -> impl Strategy<Value = Bson> {
            leaf().prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..3).prop_map(Bson::Array),
                    proptest::collection::vec(("[ab]", inner), 0..3).prop_map(|kv| {
                        let mut d = Document::new();
                        for (k, v) in kv {
                            d.insert(k, v);
                        }
                        Bson::Document(d)
                    }),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn total_order(a in value(), b in value(), c in value()) {
                let ab = compare_values(&a, &b);
                let ba = compare_values(&b, &a);
                prop_assert_eq!(ab, ba.reverse());
                prop_assert_eq!(compare_values(&a, &a), Ordering::Equal);
                let bc = compare_values(&b, &c);
                let ac = compare_values(&a, &c);
                if ab != Ordering::Greater && bc != Ordering::Greater {
                    prop_assert!(ac != Ordering::Greater, "{:?} <= {:?} <= {:?}", a, b, c);
                }
                if ab == Ordering::Equal && bc == Ordering::Equal {
                    prop_assert_eq!(ac, Ordering::Equal);
                }
                prop_assert_eq!(IdKey(a.clone()).cmp(&IdKey(b.clone())), ab);
                prop_assert_eq!(IdKey(a.clone()) == IdKey(b.clone()), ab == Ordering::Equal);
            }

            #[test]
            fn numeric_order_matches_f64_where_exact(x in -1.0e6f64..1.0e6, y in -1_000_000i64..1_000_000) {
                let o = compare_values(&Bson::Double(x), &Bson::Int64(y));
                prop_assert_eq!(o, x.partial_cmp(&(y as f64)).unwrap());
            }
        }
    }
}

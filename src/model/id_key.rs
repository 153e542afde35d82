//! The one equality key of an `_id` (issue 9 item 1): two `_id`s get the same [`IdKey`] exactly
//! when MongoDB's `_id` index treats them as the same value (BSON comparison with the simple
//! collation).
//!
//! - Numbers of all four types are keyed by their exact value: `1`, `1.0`, `NumberLong(1)` and
//!   `NumberDecimal("1.00")` are one key; two different Int64s are never one key (no `f64`
//!   round trip), a Double and a Decimal128 are one key only if their values are exactly equal
//!   (`0.1` and `NumberDecimal("0.1")` differ, as in the server). `-0` equals `0`, every NaN
//!   equals every NaN, infinities equal across types.
//! - Strings (and the deprecated Symbol, which compares as a string), ObjectIds, binaries, dates,
//!   ... are keyed by their exact bytes.
//! - Sub-documents are keyed field by field (names exact, values recursively), so `{a: 1}` and
//!   `{a: 1.0}` are one key, `{a: 1, b: 1}` and `{b: 1, a: 1}` are two.
//!
//! Not modelled: a collection whose default collation is not simple compares string `_id`s
//! under that collation ("A" and "a" are one `_id` under strength 2). The daemon refuses to
//! copy into a destination whose collation differs from the source's, and the source itself
//! never holds two such `_id`s, so byte-exact strings only ever split what the server would
//! not have stored twice.

use bson::{Bson, RawBson, RawBsonRef, RawDocument};

/// Equality key of an `_id` (see the module docs). Ordering is arbitrary but total, so the key
/// can live in both hash and tree maps.
#[derive(Clone)]
pub struct IdKey(KeyBytes);

/// Bytes of a key up to this long are held inline: the keys of integers (at most 29 bytes),
/// ObjectIds (13) and short strings are built and cloned without allocating, which matters
/// because the apply path keys, clones and drops one per event.
const INLINE_KEY: usize = 30;

#[derive(Clone)]
enum KeyBytes {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl IdKey {
    pub fn of(id: RawBsonRef<'_>) -> IdKey {
        thread_local! {
            // Keys are encoded here first, so building a short one allocates nothing.
            static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(64));
        }
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            encode_value(scratch, id);
            IdKey::from_bytes(scratch)
        })
    }

    fn from_bytes(encoded: &[u8]) -> IdKey {
        if encoded.len() <= INLINE_KEY {
            let mut bytes = [0u8; INLINE_KEY];
            bytes[..encoded.len()].copy_from_slice(encoded);
            IdKey(KeyBytes::Inline {
                len: encoded.len() as u8,
                bytes,
            })
        } else {
            IdKey(KeyBytes::Heap(encoded.into()))
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            KeyBytes::Inline { len, bytes } => &bytes[..*len as usize],
            KeyBytes::Heap(b) => b,
        }
    }

    pub fn of_raw(id: &RawBson) -> IdKey {
        IdKey::of(id.as_raw_bson_ref())
    }

    pub fn of_bson(id: &Bson) -> IdKey {
        match RawBson::try_from(id.clone()) {
            Ok(raw) => IdKey::of(raw.as_raw_bson_ref()),
            // Only documents with invalid keys (NUL in a name) fail to convert; such an `_id`
            // cannot be stored, so any faithful key will do.
            Err(_) => IdKey::from_bytes(format!("invalid:{id:?}").as_bytes()),
        }
    }
}

impl PartialEq for IdKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for IdKey {}

impl std::hash::Hash for IdKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl PartialOrd for IdKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::fmt::Debug for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdKey({:02x?})", self.as_bytes())
    }
}

// Tags are the server's canonical type ranks (`canonicalizeBSONType`), shifted to be
// non-negative: values of different ranks never compare equal.
const TAG_MIN_KEY: u8 = 0x00;
const TAG_UNDEFINED: u8 = 0x01;
const TAG_NULL: u8 = 0x06;
const TAG_NUMBER: u8 = 0x0b;
const TAG_STRING: u8 = 0x10;
const TAG_DOCUMENT: u8 = 0x15;
const TAG_ARRAY: u8 = 0x1a;
const TAG_BINARY: u8 = 0x1f;
const TAG_OBJECT_ID: u8 = 0x24;
const TAG_BOOL: u8 = 0x29;
const TAG_DATE: u8 = 0x2e;
const TAG_TIMESTAMP: u8 = 0x30;
const TAG_REGEX: u8 = 0x33;
const TAG_DB_POINTER: u8 = 0x38;
const TAG_CODE: u8 = 0x3d;
const TAG_CODE_WITH_SCOPE: u8 = 0x42;
const TAG_MAX_KEY: u8 = 0x80;

/// One more element follows / the document or array ends (names are C strings, so a name
/// followed by NUL is self-delimiting; every value encoding is self-delimiting too).
const MORE: u8 = 0x01;
const END: u8 = 0x00;

fn with_len(key: &mut Vec<u8>, bytes: &[u8]) {
    key.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    key.extend_from_slice(bytes);
}

fn encode_document(key: &mut Vec<u8>, doc: &RawDocument) {
    for item in doc.iter() {
        match item {
            Ok((name, value)) => {
                key.push(MORE);
                key.extend_from_slice(name.as_str().as_bytes());
                key.push(0);
                encode_value(key, value);
            }
            Err(_) => {
                // Malformed BSON cannot come from a server; keep the key faithful anyway.
                key.push(0xff);
                with_len(key, doc.as_bytes());
                break;
            }
        }
    }
    key.push(END);
}

fn encode_value(key: &mut Vec<u8>, value: RawBsonRef<'_>) {
    match value {
        RawBsonRef::MinKey => key.push(TAG_MIN_KEY),
        RawBsonRef::Undefined => key.push(TAG_UNDEFINED),
        RawBsonRef::Null => key.push(TAG_NULL),
        RawBsonRef::MaxKey => key.push(TAG_MAX_KEY),
        RawBsonRef::Int32(v) => encode_integer(key, v as i64),
        RawBsonRef::Int64(v) => encode_integer(key, v),
        RawBsonRef::Double(v) => encode_number(key, Number::double(v)),
        RawBsonRef::Decimal128(d) => encode_number(key, Number::decimal(d.bytes())),
        RawBsonRef::String(s) => {
            key.push(TAG_STRING);
            with_len(key, s.as_bytes());
        }
        RawBsonRef::Symbol(s) => {
            key.push(TAG_STRING);
            with_len(key, s.as_bytes());
        }
        RawBsonRef::Document(d) => {
            key.push(TAG_DOCUMENT);
            encode_document(key, d);
        }
        RawBsonRef::Array(a) => {
            key.push(TAG_ARRAY);
            for item in a {
                match item {
                    Ok(v) => {
                        key.push(MORE);
                        encode_value(key, v);
                    }
                    Err(_) => {
                        key.push(0xff);
                        with_len(key, a.as_bytes());
                        break;
                    }
                }
            }
            key.push(END);
        }
        RawBsonRef::Binary(b) => {
            key.push(TAG_BINARY);
            key.push(u8::from(b.subtype));
            with_len(key, b.bytes);
        }
        RawBsonRef::ObjectId(o) => {
            key.push(TAG_OBJECT_ID);
            key.extend_from_slice(&o.bytes());
        }
        RawBsonRef::Boolean(b) => {
            key.push(TAG_BOOL);
            key.push(b as u8);
        }
        RawBsonRef::DateTime(d) => {
            key.push(TAG_DATE);
            key.extend_from_slice(&d.timestamp_millis().to_le_bytes());
        }
        RawBsonRef::Timestamp(t) => {
            key.push(TAG_TIMESTAMP);
            key.extend_from_slice(&t.time.to_le_bytes());
            key.extend_from_slice(&t.increment.to_le_bytes());
        }
        RawBsonRef::RegularExpression(r) => {
            key.push(TAG_REGEX);
            with_len(key, r.pattern.as_str().as_bytes());
            with_len(key, r.options.as_str().as_bytes());
        }
        RawBsonRef::JavaScriptCode(c) => {
            key.push(TAG_CODE);
            with_len(key, c.as_bytes());
        }
        RawBsonRef::JavaScriptCodeWithScope(c) => {
            key.push(TAG_CODE_WITH_SCOPE);
            with_len(key, c.code.as_bytes());
            encode_document(key, c.scope);
        }
        RawBsonRef::DbPointer(p) => {
            key.push(TAG_DB_POINTER);
            let mut raw = bson::RawDocumentBuf::new();
            raw.append(bson::cstr!("p"), RawBsonRef::DbPointer(p));
            with_len(key, raw.as_bytes());
        }
    }
}

/// An exact numeric value.
#[derive(Debug, PartialEq, Eq)]
enum Number {
    NaN,
    Infinity {
        negative: bool,
    },
    Zero,
    /// `digits × 10^exponent`, `digits` in decimal without leading or trailing zeros.
    Finite {
        negative: bool,
        digits: Vec<u8>,
        exponent: i32,
    },
}

impl Number {
    /// The general path [`encode_integer`] shortcuts (kept to test it against).
    #[cfg(test)]
    fn integer(v: i64) -> Number {
        Number::finite(v < 0, BigDecimal::from_u128(v.unsigned_abs() as u128), 0)
    }

    fn double(v: f64) -> Number {
        if v.is_nan() {
            return Number::NaN;
        }
        if v.is_infinite() {
            return Number::Infinity { negative: v < 0.0 };
        }
        if v == 0.0 {
            return Number::Zero;
        }
        let bits = v.to_bits();
        let negative = bits >> 63 == 1;
        let biased = ((bits >> 52) & 0x7ff) as i32;
        let fraction = bits & ((1u64 << 52) - 1);
        // v = mantissa × 2^exp2, exactly.
        let (mantissa, exp2) = if biased == 0 {
            (fraction, -1074)
        } else {
            (fraction | (1u64 << 52), biased - 1075)
        };
        let mut n = BigDecimal::from_u128(mantissa as u128);
        if exp2 >= 0 {
            n.mul_pow(2, exp2 as u32);
            Number::finite(negative, n, 0)
        } else {
            // m × 2^-k = m × 5^k × 10^-k.
            n.mul_pow(5, (-exp2) as u32);
            Number::finite(negative, n, exp2)
        }
    }

    /// The BID encoding of a Decimal128 (non-canonical coefficients are zero, IEEE 754-2008).
    fn decimal(bytes: [u8; 16]) -> Number {
        let bits = u128::from_le_bytes(bytes);
        let negative = bits >> 127 == 1;
        let combination = (bits >> 122) & 0x1f;
        if combination == 0x1f {
            return Number::NaN;
        }
        if combination == 0x1e {
            return Number::Infinity { negative };
        }
        let (exponent, coefficient) = if (bits >> 125) & 0b11 == 0b11 {
            (((bits >> 111) & 0x3fff) as i32, 0)
        } else {
            let c = bits & ((1u128 << 113) - 1);
            let c = if c > 9_999_999_999_999_999_999_999_999_999_999 {
                0
            } else {
                c
            };
            (((bits >> 113) & 0x3fff) as i32, c)
        };
        Number::finite(
            negative,
            BigDecimal::from_u128(coefficient),
            exponent - 6176,
        )
    }

    fn finite(negative: bool, n: BigDecimal, exponent: i32) -> Number {
        let mut digits = n.to_digits();
        if digits.is_empty() {
            return Number::Zero;
        }
        let mut exponent = exponent;
        while digits.last() == Some(&b'0') {
            digits.pop();
            exponent += 1;
        }
        Number::Finite {
            negative,
            digits,
            exponent,
        }
    }
}

/// [`encode_number`] of `Number::integer(v)`, without the big-number arithmetic: integer
/// `_id`s are the common case, keyed once per event.
fn encode_integer(key: &mut Vec<u8>, v: i64) {
    if v == 0 {
        return encode_number(key, Number::Zero);
    }
    let mut m = v.unsigned_abs();
    let mut exponent = 0i32;
    while m.is_multiple_of(10) {
        m /= 10;
        exponent += 1;
    }
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    while m > 0 {
        start -= 1;
        digits[start] = b'0' + (m % 10) as u8;
        m /= 10;
    }
    key.push(TAG_NUMBER);
    key.push(if v < 0 { 4 } else { 5 });
    key.extend_from_slice(&exponent.to_le_bytes());
    with_len(key, &digits[start..]);
}

fn encode_number(key: &mut Vec<u8>, n: Number) {
    key.push(TAG_NUMBER);
    match n {
        Number::NaN => key.push(0),
        Number::Infinity { negative: true } => key.push(1),
        Number::Zero => key.push(2),
        Number::Infinity { negative: false } => key.push(3),
        Number::Finite {
            negative,
            digits,
            exponent,
        } => {
            key.push(if negative { 4 } else { 5 });
            key.extend_from_slice(&exponent.to_le_bytes());
            with_len(key, &digits);
        }
    }
}

/// A non-negative integer in base 10^9 limbs (least significant first): just enough arithmetic
/// to expand a double exactly (at most ~770 decimal digits).
struct BigDecimal(Vec<u32>);

const LIMB: u64 = 1_000_000_000;

impl BigDecimal {
    fn from_u128(mut v: u128) -> BigDecimal {
        let mut limbs = Vec::new();
        while v > 0 {
            limbs.push((v % LIMB as u128) as u32);
            v /= LIMB as u128;
        }
        BigDecimal(limbs)
    }

    fn mul_small(&mut self, m: u32) {
        let mut carry = 0u64;
        for limb in &mut self.0 {
            let x = *limb as u64 * m as u64 + carry;
            *limb = (x % LIMB) as u32;
            carry = x / LIMB;
        }
        while carry > 0 {
            self.0.push((carry % LIMB) as u32);
            carry /= LIMB;
        }
    }

    /// Multiplies by `base^exp` (`base` is 2 or 5).
    fn mul_pow(&mut self, base: u32, mut exp: u32) {
        // The largest power of `base` below 2^32 keeps every step inside u64.
        let (chunk, chunk_exp) = if base == 2 {
            (1u32 << 31, 31)
        } else {
            (1_220_703_125, 13)
        };
        while exp >= chunk_exp {
            self.mul_small(chunk);
            exp -= chunk_exp;
        }
        if exp > 0 {
            self.mul_small(base.pow(exp));
        }
    }

    /// Decimal digits, most significant first; empty for zero.
    fn to_digits(&self) -> Vec<u8> {
        let Some((top, rest)) = self.0.split_last() else {
            return Vec::new();
        };
        let mut out = top.to_string().into_bytes();
        for limb in rest.iter().rev() {
            out.extend_from_slice(format!("{limb:09}").as_bytes());
        }
        if out == b"0" {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::{cmp::Ordering, str::FromStr};

    use bson::{doc, oid::ObjectId, Decimal128};
    use mongo_sim::query::compare::compare_values;
    use proptest::prelude::*;

    use super::*;

    fn key(b: &Bson) -> IdKey {
        IdKey::of_bson(b)
    }

    fn integer_key_the_general_way(v: i64) -> Vec<u8> {
        let mut key = Vec::new();
        encode_number(&mut key, Number::integer(v));
        key
    }

    #[test]
    fn integer_keys_take_a_shortcut_to_the_same_bytes() {
        let mut cases = vec![0, 1, -1, 9, 10, -10, 100, 120, 1_000_000_000, 1_000_000_007];
        cases.extend([
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
            9_007_199_254_740_992,
            -4_200,
        ]);
        for v in cases {
            let mut fast = Vec::new();
            encode_integer(&mut fast, v);
            assert_eq!(fast, integer_key_the_general_way(v), "{v}");
        }
    }

    #[test]
    fn short_keys_are_inline_and_long_ones_on_the_heap_with_one_equality() {
        let short = key(&Bson::Int64(i64::MIN));
        assert!(matches!(short.0, KeyBytes::Inline { .. }));
        let long_text = "x".repeat(100);
        let long = key(&Bson::String(long_text.clone()));
        assert!(matches!(long.0, KeyBytes::Heap(_)));
        assert_eq!(long, key(&Bson::String(long_text)));
        assert_ne!(long, key(&Bson::String("x".repeat(99))));
        assert_eq!(short.clone(), short);
        // The boundary: a string whose key is exactly the inline size, and one byte more.
        let at = |n: usize| key(&Bson::String("y".repeat(n)));
        let sizes: Vec<usize> = (15..30).map(|n| at(n).as_bytes().len()).collect();
        let inline_max = (15..30)
            .find(|n| at(*n).as_bytes().len() == INLINE_KEY)
            .unwrap();
        assert!(sizes.contains(&INLINE_KEY));
        assert!(matches!(at(inline_max).0, KeyBytes::Inline { .. }));
        assert!(matches!(at(inline_max + 1).0, KeyBytes::Heap(_)));
        assert!(at(inline_max) < at(inline_max + 1) || at(inline_max) > at(inline_max + 1));
    }

    fn dec(s: &str) -> Bson {
        Bson::Decimal128(Decimal128::from_str(s).unwrap())
    }

    #[test]
    fn adjacent_large_int64s_are_different_ids() {
        let a = (1i64 << 53) + 1;
        assert_ne!(key(&Bson::Int64(a)), key(&Bson::Int64(a + 1)));
        assert_ne!(key(&Bson::Int64(i64::MAX)), key(&Bson::Int64(i64::MAX - 1)));
        // The double nearest to 2^53 + 1 is 2^53: equal to that Int64 only.
        assert_eq!(
            key(&Bson::Int64(1i64 << 53)),
            key(&Bson::Double((1u64 << 53) as f64))
        );
        assert_ne!(key(&Bson::Int64(a)), key(&Bson::Double(a as f64)));
    }

    #[test]
    fn equal_numbers_of_every_type_share_a_key() {
        let one = key(&Bson::Int32(1));
        for v in [
            Bson::Int64(1),
            Bson::Double(1.0),
            dec("1"),
            dec("1.000"),
            dec("0.01E+2"),
        ] {
            assert_eq!(key(&v), one, "{v:?}");
        }
        assert_eq!(key(&Bson::Double(-0.0)), key(&Bson::Int32(0)));
        assert_eq!(key(&dec("-0E+5")), key(&Bson::Int32(0)));
        assert_eq!(key(&dec("NaN")), key(&Bson::Double(f64::NAN)));
        assert_eq!(
            key(&dec("-Infinity")),
            key(&Bson::Double(f64::NEG_INFINITY))
        );
        assert_eq!(key(&Bson::Double(0.5)), key(&dec("0.50")));
        assert_ne!(key(&Bson::Double(0.1)), key(&dec("0.1")));
        assert_ne!(key(&Bson::Int32(1)), key(&Bson::String("1".into())));
        assert_eq!(
            key(&Bson::Document(doc! {"a": 1, "b": "x"})),
            key(&Bson::Document(doc! {"a": 1.0, "b": "x"}))
        );
        assert_ne!(
            key(&Bson::Document(doc! {"a": 1, "b": 1})),
            key(&Bson::Document(doc! {"b": 1, "a": 1}))
        );
    }

    /// `_id` candidates chosen so that equal values of different types and near-collisions
    /// are frequent.
    fn numbers() -> impl Strategy<Value = Bson> {
        let big = (1i64 << 53) - 3;
        prop_oneof![
            (-3i32..4).prop_map(Bson::Int32),
            (-3i64..4).prop_map(Bson::Int64),
            (0i64..8).prop_map(move |d| Bson::Int64(big + d)),
            (0i64..8).prop_map(move |d| Bson::Double((big + d) as f64)),
            (0i64..4).prop_map(|d| Bson::Int64(i64::MAX - d)),
            Just(Bson::Double(9.223_372_036_854_776e18)),
            (-6i32..7).prop_map(|h| Bson::Double(h as f64 / 2.0)),
            Just(Bson::Double(-0.0)),
            Just(Bson::Double(0.1)),
            Just(Bson::Double(f64::NAN)),
            Just(Bson::Double(f64::INFINITY)),
            Just(Bson::Double(f64::MIN_POSITIVE / 4.0)),
            prop::sample::select(vec![
                "0",
                "-0",
                "1",
                "1.0",
                "1.50",
                "-1",
                "3E+0",
                "0.1",
                "0.5",
                "2.5E-1",
                "NaN",
                "Infinity",
                "-Infinity",
                "9007199254740993",
                "9007199254740992.0",
                "9223372036854775807",
                "1E-400",
            ])
            .prop_map(dec),
        ]
    }

    fn ids() -> impl Strategy<Value = Bson> {
        let leaf = prop_oneof![
            numbers(),
            prop::sample::select(vec!["a", "A", "1", ""]).prop_map(|s| Bson::String(s.into())),
            (0u8..3).prop_map(|b| Bson::ObjectId(ObjectId::from_bytes([b; 12]))),
            Just(Bson::Null),
            any::<bool>().prop_map(Bson::Boolean),
        ];
        leaf.prop_recursive(2, 6, 2, |inner| {
            prop::collection::vec((prop::sample::select(vec!["a", "b"]), inner), 0..3).prop_map(
                |fields| {
                    let mut d = bson::Document::new();
                    for (k, v) in fields {
                        d.insert(k, v);
                    }
                    Bson::Document(d)
                },
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Two `_id`s share a key exactly when the simulator's server comparison (exact
        /// numeric comparison across types, field-by-field documents) says they are equal.
        #[test]
        fn keys_are_equal_exactly_when_the_server_compares_equal(a in ids(), b in ids()) {
            let same = compare_values(&a, &b) == Ordering::Equal;
            prop_assert_eq!(key(&a) == key(&b), same, "{:?} vs {:?}", a, b);
        }
    }
}

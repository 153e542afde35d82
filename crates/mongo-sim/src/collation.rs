//! Collation: MongoDB's collation document, parsed and checked as the 7.0 server does
//! (`collation.idl` + `CollatorFactoryICU::makeFromBSON`), compared with ICU4X's
//! `icu_collator` (Unicode Collation Algorithm with CLDR tailorings).
//!
//! Strings are compared through their collation *sort keys*: [`Collation::key_of`] replaces
//! every string of a value (recursively, as `CollationIndexKey::collationAwareIndexKeyAppend`
//! does for index keys) by the hex spelling of its sort key, which orders bytewise as the
//! sort key does. The store keys `_id` and unique indexes of a collection with a default
//! collation that way, so "Bob" and "bob" are one key under strength 2.
//!
//! Query comparisons ([`crate::query::compare::compare_values`] on two strings) use the
//! collation installed for the current thread by [`install`]: each command installs its
//! effective collation (its own `collation`, else the collection's default) for its
//! synchronous body only.

use std::{cell::RefCell, cmp::Ordering, fmt::Write as _, sync::Arc};

use bson::{Bson, Document};
use icu_collator::{
    options::{AlternateHandling, CaseLevel, CollatorOptions, MaxVariable, Strength},
    preferences::{CollationCaseFirst, CollationNumericOrdering},
    CollatorBorrowed, CollatorPreferences,
};

use crate::error::{codes, CommandError, CommandResult};

/// The ICU version MongoDB 7.0 reports in a collation's `version` field (it vendors ICU 57.1).
pub const ICU_VERSION: &str = "57.1";

/// The locales of the manual's "Supported Languages and Locales" table (7.0), without the
/// `@collation=<variant>` forms.
const LOCALES: &[&str] = &[
    "af", "sq", "am", "ar", "hy", "as", "az", "bn", "be", "bs", "bs_Cyrl", "bg", "my", "ca", "chr",
    "zh", "zh_Hant", "hr", "cs", "da", "nl", "dz", "en", "en_US", "eo", "et", "ee", "fo", "fil",
    "fi", "fr", "fr_CA", "gl", "ka", "de", "de_AT", "el", "gu", "ha", "haw", "he", "hi", "hu",
    "is", "ig", "smn", "id", "ga", "it", "ja", "kl", "kn", "kk", "km", "kok", "ko", "ky", "lo",
    "lv", "ln", "lt", "dsb", "lb", "mk", "ms", "ml", "mt", "mr", "mn", "ne", "se", "nb", "nn",
    "or", "om", "ps", "fa", "fa_AF", "pl", "pt", "pa", "ro", "ru", "sr", "sr_Latn", "si", "sk",
    "sl", "es", "sw", "sv", "ta", "te", "th", "bo", "to", "tr", "uk", "hsb", "ur", "ug", "vi",
    "wae", "cy", "yi", "yo", "zu",
];

/// `caseFirst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseFirst {
    Upper,
    Lower,
    Off,
}

/// A non-simple collation: the full spec (every field resolved, as `listCollections` and
/// `listIndexes` show it) and its collator.
pub struct Collation {
    pub locale: String,
    pub case_level: bool,
    pub case_first: CaseFirst,
    pub strength: i32,
    pub numeric_ordering: bool,
    /// `alternate: "shifted"` (else `"non-ignorable"`).
    pub shifted: bool,
    /// `maxVariable: "space"` (else `"punct"`).
    pub max_variable_space: bool,
    pub normalization: bool,
    pub backwards: bool,
    collator: CollatorBorrowed<'static>,
}

impl std::fmt::Debug for Collation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Collation({})", self.to_document())
    }
}

impl PartialEq for Collation {
    fn eq(&self, other: &Self) -> bool {
        self.to_document() == other.to_document()
    }
}

fn bad_value(msg: String) -> CommandError {
    CommandError::new(codes::BAD_VALUE, msg)
}

fn wrong_type(field: &str, v: &Bson, expected: &str) -> CommandError {
    CommandError::type_mismatch(format!(
        "BSON field 'collation.{field}' is the wrong type '{}', expected type '{expected}'",
        crate::query::compare::type_name(v)
    ))
}

fn bad_enum(field: &str, shown: &str) -> CommandError {
    bad_value(format!(
        "Enumeration value '{shown}' for field 'collation.{field}' is not a valid value."
    ))
}

/// A BSON value as the server's `BSONObj::toString` prints it (`{ locale: "xx", strength: 1 }`).
pub fn shell_string(v: &Bson) -> String {
    match v {
        Bson::String(s) => format!("\"{s}\""),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        Bson::Double(d) if d.fract() == 0.0 && d.is_finite() => format!("{d:.1}"),
        Bson::Double(d) => d.to_string(),
        Bson::Boolean(b) => b.to_string(),
        Bson::Null => "null".into(),
        Bson::Document(d) => {
            if d.is_empty() {
                return "{}".into();
            }
            let mut out = String::from("{ ");
            for (i, (k, v)) in d.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{k}: {}", shell_string(v));
            }
            out.push_str(" }");
            out
        }
        Bson::Array(a) => {
            let items: Vec<String> = a.iter().map(shell_string).collect();
            format!("[ {} ]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Parses a collation document. `Ok(None)` is the simple (binary) collation: `{locale:
/// "simple"}`. An empty document is the caller's business (commands treat it as absent).
pub fn parse(spec: &Document) -> CommandResult<Option<Arc<Collation>>> {
    let mut locale: Option<String> = None;
    let mut case_level = None;
    let mut case_first = None;
    let mut strength: Option<i32> = None;
    let mut numeric = None;
    let mut shifted = None;
    let mut space = None;
    let mut normalization = None;
    let mut backwards = None;
    let mut version: Option<String> = None;
    let as_bool = |k: &str, v: &Bson| match v {
        Bson::Boolean(b) => Ok(Some(*b)),
        Bson::Null | Bson::Undefined => Ok(None),
        _ => Err(wrong_type(k, v, "bool")),
    };
    let as_str = |k: &str, v: &Bson| match v {
        Bson::String(s) => Ok(Some(s.clone())),
        Bson::Null | Bson::Undefined => Ok(None),
        _ => Err(wrong_type(k, v, "string")),
    };
    for (k, v) in spec {
        match k.as_str() {
            "locale" => locale = as_str(k, v)?,
            "caseLevel" => case_level = as_bool(k, v)?,
            "numericOrdering" => numeric = as_bool(k, v)?,
            "normalization" => normalization = as_bool(k, v)?,
            "backwards" => backwards = as_bool(k, v)?,
            "version" => version = as_str(k, v)?,
            "caseFirst" => {
                case_first = match as_str(k, v)?.as_deref() {
                    None => None,
                    Some("upper") => Some(CaseFirst::Upper),
                    Some("lower") => Some(CaseFirst::Lower),
                    Some("off") => Some(CaseFirst::Off),
                    Some(other) => return Err(bad_enum(k, other)),
                }
            }
            "alternate" => {
                shifted = match as_str(k, v)?.as_deref() {
                    None => None,
                    Some("shifted") => Some(true),
                    Some("non-ignorable") => Some(false),
                    Some(other) => return Err(bad_enum(k, other)),
                }
            }
            "maxVariable" => {
                space = match as_str(k, v)?.as_deref() {
                    None => None,
                    Some("space") => Some(true),
                    Some("punct") => Some(false),
                    Some(other) => return Err(bad_enum(k, other)),
                }
            }
            "strength" => {
                // `safeInt`: int, long or a double holding an integer.
                let n: i64 = match v {
                    Bson::Int32(i) => *i as i64,
                    Bson::Int64(i) => *i,
                    Bson::Double(d) if d.fract() == 0.0 && d.abs() < 2e9 => *d as i64,
                    Bson::Double(_) => {
                        return Err(bad_value(format!(
                            "BSON field 'collation.strength' value must be an integer, actual value '{}'",
                            shell_string(v)
                        )))
                    }
                    Bson::Null | Bson::Undefined => continue,
                    _ => return Err(wrong_type(k, v, "int")),
                };
                if n < 0 {
                    return Err(CommandError::new(
                        51024,
                        format!("BSON field 'collation.strength' value must be >= 0, actual value '{n}'"),
                    ));
                }
                if n > 5 {
                    return Err(CommandError::new(
                        51024,
                        format!("BSON field 'collation.strength' value must be <= 5, actual value '{n}'"),
                    ));
                }
                if n == 0 {
                    return Err(bad_enum("strength", "0"));
                }
                strength = Some(n as i32);
            }
            _ => {
                return Err(CommandError::new(
                    codes::LOCATION_40415_UNKNOWN_FIELD,
                    format!("BSON field 'collation.{k}' is an unknown field."),
                ))
            }
        }
    }
    let shown = shell_string(&Bson::Document(spec.clone()));
    let Some(locale) = locale else {
        return Err(CommandError::new(
            40414,
            "BSON field 'collation.locale' is missing but a required field",
        ));
    };
    if locale.contains('\0') {
        return Err(bad_value(format!(
            "Field 'locale' cannot contain null byte. Collation spec: {shown}"
        )));
    }
    if locale == "simple" {
        return Ok(None);
    }
    if locale.is_empty() {
        return Err(bad_value(format!(
            "Field 'locale' cannot be the empty string in: {shown}"
        )));
    }
    if let Some((base, variant)) = locale.split_once("@collation=") {
        if LOCALES.contains(&base) {
            return Err(CommandError::new(
                codes::COMMAND_NOT_SUPPORTED,
                format!(
                    "collation locale variants are not supported by the simulator: '{locale}' (@collation={variant})"
                ),
            ));
        }
    }
    if locale == "en_US_POSIX" {
        return Err(CommandError::new(
            codes::COMMAND_NOT_SUPPORTED,
            "collation locale 'en_US_POSIX' is not supported by the simulator",
        ));
    }
    if !LOCALES.contains(&locale.as_str()) {
        return Err(bad_value(format!("Field 'locale' is invalid in: {shown}")));
    }
    let icu_locale = icu_locale_core::Locale::try_from_str(&locale.replace('_', "-"))
        .map_err(|_| bad_value(format!("Field 'locale' is invalid in: {shown}")))?;
    let base_prefs = CollatorPreferences::from(&icu_locale);
    // The locale's own defaults first (caseFirst upper for da, alternate shifted for th,
    // backwards for fr_CA), then the spec's explicit values on top.
    let defaults = CollatorBorrowed::try_new(base_prefs, CollatorOptions::default())
        .map_err(|e| CommandError::new(codes::INTERNAL_ERROR, format!("collator: {e}")))?;
    let resolved = defaults.resolved_options();
    let locale_backwards = locale == "fr_CA";
    let strength = strength.unwrap_or(match resolved.strength {
        Strength::Primary => 1,
        Strength::Secondary => 2,
        Strength::Quaternary => 4,
        Strength::Identical => 5,
        _ => 3,
    });
    let case_level = case_level.unwrap_or(resolved.case_level == CaseLevel::On);
    let case_first = case_first.unwrap_or(match resolved.case_first {
        CollationCaseFirst::Upper => CaseFirst::Upper,
        CollationCaseFirst::Lower => CaseFirst::Lower,
        _ => CaseFirst::Off,
    });
    let numeric_ordering = numeric.unwrap_or(resolved.numeric == CollationNumericOrdering::True);
    let shifted = shifted.unwrap_or(resolved.alternate_handling == AlternateHandling::Shifted);
    let max_variable_space = space.unwrap_or(resolved.max_variable == MaxVariable::Space);
    let backwards_value = backwards.unwrap_or(locale_backwards);
    if let Some(v) = version {
        if v != ICU_VERSION {
            return Err(CommandError::new(
                161,
                format!(
                    "Requested collation version {v} but the only available collator version was {ICU_VERSION}. Requested collation spec: {shown}"
                ),
            ));
        }
    }
    if backwards_value && strength == 1 {
        return Err(bad_value(format!(
            "'backwards' is invalid with 'strength' of 1 in: {shown}"
        )));
    }
    if case_first != CaseFirst::Off && !case_level && strength <= 2 {
        return Err(bad_value(format!(
            "'caseFirst' is invalid unless 'caseLevel' is on or 'strength' is greater than 2 in: {shown}"
        )));
    }
    if backwards_value != locale_backwards {
        // ICU4X sets backward secondary weighting from the locale only (fr-CA).
        return Err(CommandError::new(
            codes::COMMAND_NOT_SUPPORTED,
            format!(
                "collation 'backwards: {backwards_value}' for locale '{locale}' is not supported by the simulator (only fr_CA's own default)"
            ),
        ));
    }
    let mut prefs = CollatorPreferences::from(&icu_locale);
    prefs.case_first = Some(match case_first {
        CaseFirst::Upper => CollationCaseFirst::Upper,
        CaseFirst::Lower => CollationCaseFirst::Lower,
        CaseFirst::Off => CollationCaseFirst::False,
    });
    prefs.numeric_ordering = Some(if numeric_ordering {
        CollationNumericOrdering::True
    } else {
        CollationNumericOrdering::False
    });
    let mut options = CollatorOptions::default();
    options.strength = Some(match strength {
        1 => Strength::Primary,
        2 => Strength::Secondary,
        3 => Strength::Tertiary,
        4 => Strength::Quaternary,
        _ => Strength::Identical,
    });
    options.case_level = Some(if case_level {
        CaseLevel::On
    } else {
        CaseLevel::Off
    });
    options.alternate_handling = Some(if shifted {
        AlternateHandling::Shifted
    } else {
        AlternateHandling::NonIgnorable
    });
    options.max_variable = Some(if max_variable_space {
        MaxVariable::Space
    } else {
        MaxVariable::Punctuation
    });
    let collator = CollatorBorrowed::try_new(prefs, options)
        .map_err(|e| CommandError::new(codes::INTERNAL_ERROR, format!("collator: {e}")))?;
    Ok(Some(Arc::new(Collation {
        locale,
        case_level,
        case_first,
        strength,
        numeric_ordering,
        shifted,
        max_variable_space,
        normalization: normalization.unwrap_or(false),
        backwards: backwards_value,
        collator,
    })))
}

/// Parses a command's (or an index's) `collation` argument: a document, empty meaning absent.
/// `Ok(None)` = absent; `Ok(Some(None))` = explicitly simple.
pub fn parse_arg(path: &str, v: &Bson) -> CommandResult<Option<Option<Arc<Collation>>>> {
    match v {
        Bson::Document(d) if d.is_empty() => Ok(None),
        Bson::Document(d) => Ok(Some(parse(d)?)),
        _ => Err(CommandError::type_mismatch(format!(
            "BSON field '{path}' is the wrong type '{}', expected type 'object'",
            crate::query::compare::type_name(v)
        ))),
    }
}

/// The collation an operation runs under: its own `collation` argument (an empty document
/// counts as absent), else the collection's default.
pub fn effective(
    arg: Option<&Bson>,
    default: Option<&Arc<Collation>>,
) -> CommandResult<Option<Arc<Collation>>> {
    match arg {
        Some(v) => match parse_arg("collation", v)? {
            Some(explicit) => Ok(explicit),
            None => Ok(default.cloned()),
        },
        None => Ok(default.cloned()),
    }
}

impl Collation {
    /// The full spec, every field filled in, as the server reports it.
    pub fn to_document(&self) -> Document {
        bson::doc! {
            "locale": self.locale.clone(),
            "caseLevel": self.case_level,
            "caseFirst": match self.case_first {
                CaseFirst::Upper => "upper",
                CaseFirst::Lower => "lower",
                CaseFirst::Off => "off",
            },
            "strength": self.strength,
            "numericOrdering": self.numeric_ordering,
            "alternate": if self.shifted { "shifted" } else { "non-ignorable" },
            "maxVariable": if self.max_variable_space { "space" } else { "punct" },
            "normalization": self.normalization,
            "backwards": self.backwards,
            "version": ICU_VERSION,
        }
    }

    pub fn compare_str(&self, a: &str, b: &str) -> Ordering {
        self.collator.compare(a, b)
    }

    /// The hex spelling of `s`'s sort key: two strings compare under this collation as their
    /// keys compare bytewise.
    pub fn sort_key(&self, s: &str) -> String {
        let mut bytes: Vec<u8> = Vec::new();
        let Ok(()) = self.collator.write_sort_key_to(s, &mut bytes);
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// `v` with every string (and symbol) replaced by its sort key, recursively: the value a
    /// collated index stores.
    pub fn key_of(&self, v: &Bson) -> Bson {
        match v {
            Bson::String(s) | Bson::Symbol(s) => Bson::String(self.sort_key(s)),
            Bson::Document(d) => {
                Bson::Document(d.iter().map(|(k, v)| (k.clone(), self.key_of(v))).collect())
            }
            Bson::Array(a) => Bson::Array(a.iter().map(|v| self.key_of(v)).collect()),
            other => other.clone(),
        }
    }
}

/// `key_of` under an optional collation.
pub fn key_of(c: Option<&Arc<Collation>>, v: &Bson) -> Bson {
    match c {
        Some(c) => c.key_of(v),
        None => v.clone(),
    }
}

/// Whether two optional collations are the same (both simple, or equal specs).
pub fn same(a: Option<&Arc<Collation>>, b: Option<&Arc<Collation>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Collation>>> = const { RefCell::new(None) };
}

/// Restores the previously installed collation when dropped.
pub struct Installed {
    previous: Option<Arc<Collation>>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// Installs `c` as the collation string comparisons of this thread use, until the returned
/// guard drops. Hold it only across synchronous code.
#[must_use]
pub fn install(c: Option<Arc<Collation>>) -> Installed {
    let previous = CURRENT.with(|cur| std::mem::replace(&mut *cur.borrow_mut(), c));
    Installed { previous }
}

/// Compares two strings under the installed collation (binary when none).
pub fn compare_strings(a: &str, b: &str) -> Ordering {
    CURRENT.with(|c| match &*c.borrow() {
        Some(coll) => coll.compare_str(a, b),
        None => a.as_bytes().cmp(b.as_bytes()),
    })
}

/// The installed collation, if any.
pub fn current() -> Option<Arc<Collation>> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;

    fn coll(spec: Document) -> Arc<Collation> {
        parse(&spec).unwrap().unwrap()
    }

    #[test]
    fn simple_is_none_and_defaults_are_filled_in() {
        assert!(parse(&doc! {"locale": "simple"}).unwrap().is_none());
        let en = coll(doc! {"locale": "en"});
        assert_eq!(
            en.to_document(),
            doc! {"locale": "en", "caseLevel": false, "caseFirst": "off", "strength": 3,
            "numericOrdering": false, "alternate": "non-ignorable", "maxVariable": "punct",
            "normalization": false, "backwards": false, "version": "57.1"}
        );
        assert!(coll(doc! {"locale": "fr_CA"}).backwards);
    }

    #[test]
    fn strengths_and_options() {
        let s2 = coll(doc! {"locale": "en", "strength": 2});
        assert_eq!(s2.compare_str("Bob", "bob"), Ordering::Equal);
        assert_eq!(s2.sort_key("Bob"), s2.sort_key("bob"));
        assert_ne!(s2.compare_str("cafe", "café"), Ordering::Equal);
        let s1 = coll(doc! {"locale": "en", "strength": 1});
        assert_eq!(s1.compare_str("cafe", "Café"), Ordering::Equal);
        let s3 = coll(doc! {"locale": "en"});
        assert_eq!(s3.compare_str("bob", "Bob"), Ordering::Less);
        let upper = coll(doc! {"locale": "en", "caseFirst": "upper"});
        assert_eq!(upper.compare_str("Bob", "bob"), Ordering::Less);
        let num = coll(doc! {"locale": "en", "numericOrdering": true});
        assert_eq!(num.compare_str("10", "9"), Ordering::Greater);
        assert_eq!(s3.compare_str("10", "9"), Ordering::Less);
        let case_level = coll(doc! {"locale": "en", "strength": 1, "caseLevel": true});
        assert_eq!(case_level.compare_str("cafe", "café"), Ordering::Equal);
        assert_ne!(case_level.compare_str("cafe", "Cafe"), Ordering::Equal);
        let shifted = coll(doc! {"locale": "en", "alternate": "shifted"});
        assert_eq!(shifted.compare_str("a b", "ab"), Ordering::Equal);
        let de = coll(doc! {"locale": "de"});
        assert_eq!(de.compare_str("Äpfel", "Birne"), Ordering::Less);
    }

    #[test]
    fn invalid_specs_fail_as_the_server_does() {
        let code = |d: Document| parse(&d).unwrap_err().code;
        assert_eq!(code(doc! {"locale": "en", "foo": 1}), 40415);
        assert_eq!(code(doc! {"strength": 1}), 40414);
        assert_eq!(code(doc! {"locale": "xx"}), 2);
        assert_eq!(code(doc! {"locale": ""}), 2);
        assert_eq!(code(doc! {"locale": "en", "strength": 6}), 51024);
        assert_eq!(code(doc! {"locale": "en", "strength": 0}), 2);
        assert_eq!(code(doc! {"locale": "en", "caseLevel": "yes"}), 14);
        assert_eq!(code(doc! {"locale": "en", "caseFirst": "x"}), 2);
        assert_eq!(
            code(doc! {"locale": "en", "strength": 2, "caseFirst": "upper"}),
            2
        );
        assert_eq!(code(doc! {"locale": "fr_CA", "strength": 1}), 2);
        assert_eq!(code(doc! {"locale": "en", "version": "1.0"}), 161);
        assert_eq!(code(doc! {"locale": "en", "backwards": true}), 115);
        assert_eq!(
            parse(&doc! {"locale": "xx"}).unwrap_err().message,
            "Field 'locale' is invalid in: { locale: \"xx\" }"
        );
    }
}

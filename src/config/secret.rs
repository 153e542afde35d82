//! Secrets that cannot be printed by accident, and redaction of connection strings.
//!
//! Connection strings and API tokens are held in [`Secret`], whose `Debug` and `Display` print
//! `***` and which deliberately does not implement `Serialize`. Anything that must show a
//! connection string to a human (the `check-config` output, status, logs) goes through
//! [`redact_uri`] or [`redact_text`].

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// What every redacted value prints as.
pub const REDACTED: &str = "***";

/// A value that must never reach logs, metrics, status or printed config.
///
/// `Debug` and `Display` print `***`. There is no `Serialize` impl on purpose: to show a secret
/// you must call [`Secret::expose`] and think about where it goes.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value. Call sites are where secrets leave the wrapper: keep them few.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl<'de> Deserialize<'de> for Secret<String> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(LenientStringVisitor { secret: true })
            .map(Secret)
    }
}

/// Accepts strings, and numbers or booleans rendered as strings.
///
/// Environment variables are parsed as TOML-like values, so `MONGO_SYNCD_HTTP__TOKEN=12345`
/// arrives as an integer; for string-typed keys that is still the string the operator meant.
/// For secrets the error message never echoes the value.
pub(crate) struct LenientStringVisitor {
    pub(crate) secret: bool,
}

impl<'de> Visitor<'de> for LenientStringVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        if self.secret {
            // A boolean secret is almost certainly a mistake, but say so without echoing it.
            return Err(E::custom("expected a string"));
        }
        Ok(v.to_string())
    }
}

/// `deserialize_with` helper for plain (non-secret) string keys; see [`LenientStringVisitor`].
pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(LenientStringVisitor { secret: false })
}

/// `deserialize_with` helper for optional plain string keys.
pub(crate) fn lenient_opt_string<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    lenient_string(d).map(Some)
}

/// Query options whose values are secrets. Matched case-insensitively.
const SECRET_QUERY_KEYS: &[&str] = &[
    "password",
    "tlscertificatekeyfilepassword",
    "sslpemkeypassword",
    "sslclientcertificatekeypassword",
];

/// Returns `uri` with its password and any secret query options replaced by `***`.
///
/// `mongodb://user:pass@h1,h2/db?x=1` becomes `mongodb://user:***@h1,h2/db?x=1`; the user name,
/// hosts, database and other options are kept because operators need them to tell deployments
/// apart. Works for `mongodb+srv://` too. A URI without credentials is returned unchanged.
/// Secret query options (`tlsCertificateKeyFilePassword`, ..., and tokens inside
/// `authMechanismProperties`) are redacted as well.
pub fn redact_uri(uri: &str) -> String {
    let (scheme, rest) = match uri.find("://") {
        Some(pos) => (&uri[..pos + 3], &uri[pos + 3..]),
        None => ("", uri),
    };
    // Credentials end at the last '@' before the query string: user names and passwords are
    // supposed to be percent-encoded, but a raw '@' or '/' in a password must still not leak.
    let query_start = rest.find('?').unwrap_or(rest.len());
    let (authority_and_path, query) = rest.split_at(query_start);

    let mut out = String::with_capacity(uri.len());
    out.push_str(scheme);
    match authority_and_path.rfind('@') {
        Some(at) => {
            let userinfo = &authority_and_path[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push(':');
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority_and_path[at..]);
        }
        None => out.push_str(authority_and_path),
    }
    if let Some(options) = query.strip_prefix('?') {
        out.push('?');
        out.push_str(&redact_query(options));
    }
    out
}

fn redact_query(options: &str) -> String {
    options
        .split('&')
        .map(|pair| {
            let Some((key, value)) = pair.split_once('=') else {
                return pair.to_owned();
            };
            let lower = key.to_ascii_lowercase();
            if SECRET_QUERY_KEYS.contains(&lower.as_str()) {
                format!("{key}={REDACTED}")
            } else if lower == "authmechanismproperties" {
                format!("{key}={}", redact_mechanism_properties(value))
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `AWS_SESSION_TOKEN:abc,SERVICE_NAME:x` → `AWS_SESSION_TOKEN:***,SERVICE_NAME:x`.
fn redact_mechanism_properties(value: &str) -> String {
    // The separator may be percent-encoded (`%3A`, `%2C`) in a URI; handle both spellings.
    let sep_colon = if value.contains(':') { ":" } else { "%3A" };
    let sep_comma = if value.contains(',') { "," } else { "%2C" };
    value
        .split(sep_comma)
        .map(|prop| match prop.split_once(sep_colon) {
            Some((k, _)) => {
                let upper = k.to_ascii_uppercase();
                if upper.contains("TOKEN") || upper.contains("PASSWORD") || upper.contains("SECRET")
                {
                    format!("{k}{sep_colon}{REDACTED}")
                } else {
                    prop.to_owned()
                }
            }
            None => prop.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(sep_comma)
}

/// Redacts every MongoDB connection string embedded in free text (error messages from the
/// driver or the TOML parser may quote the URI they choked on).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("mongodb") {
        let candidate = &rest[pos..];
        if candidate.starts_with("mongodb://") || candidate.starts_with("mongodb+srv://") {
            out.push_str(&rest[..pos]);
            // A URI ends at whitespace or a quote.
            let end = candidate
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '`')
                .unwrap_or(candidate.len());
            out.push_str(&redact_uri(&candidate[..end]));
            rest = &candidate[end..];
        } else {
            out.push_str(&rest[..pos + "mongodb".len()]);
            rest = &rest[pos + "mongodb".len()..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn redact_uri_table() {
        let cases = [
            (
                "mongodb://user:pass@h1,h2/db?x=1",
                "mongodb://user:***@h1,h2/db?x=1",
            ),
            (
                "mongodb+srv://app:s3cr3t@cluster0.example.net/?retryWrites=true",
                "mongodb+srv://app:***@cluster0.example.net/?retryWrites=true",
            ),
            ("mongodb://h1:27017,h2:27017", "mongodb://h1:27017,h2:27017"),
            (
                "mongodb://h1/?replicaSet=rs0&appName=a",
                "mongodb://h1/?replicaSet=rs0&appName=a",
            ),
            // X.509 / user-only credentials carry no password.
            ("mongodb://CN=client@h1/", "mongodb://CN=client@h1/"),
            // Unencoded '@' and '/' inside the password must not leak.
            ("mongodb://u:p@ss/w@h1/db", "mongodb://u:***@h1/db"),
            (
                "mongodb://h1/?tls=true&tlsCertificateKeyFilePassword=topsecret&w=majority",
                "mongodb://h1/?tls=true&tlsCertificateKeyFilePassword=***&w=majority",
            ),
            (
                "mongodb://u:p@h1/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:tok,SERVICE_NAME:x",
                "mongodb://u:***@h1/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:***,SERVICE_NAME:x",
            ),
            ("mongodb://u:@h1", "mongodb://u:***@h1"),
            ("not a uri", "not a uri"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_uri(input), want, "input {input}");
        }
    }

    #[test]
    fn redact_text_finds_embedded_uris() {
        let text = "failed to parse \"mongodb://u:pw1@h1/?x\" and mongodb+srv://a:pw2@c.example.net ok mongodb rocks";
        let got = redact_text(text);
        assert!(!got.contains("pw1") && !got.contains("pw2"), "{got}");
        assert!(got.contains("mongodb://u:***@h1/?x"), "{got}");
        assert!(got.contains("mongodb+srv://a:***@c.example.net"), "{got}");
        assert!(got.ends_with("ok mongodb rocks"), "{got}");
    }
}

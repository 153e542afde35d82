//! Loading: defaults → TOML file → `MONGO_SYNCD_<SECTION>__<KEY>` environment variables →
//! secret files (`uri_file`, `token_file`) → [`Config::validate`].
//!
//! Every error names the key path it concerns and where the value came from (the file or the
//! environment variable). Values are never echoed for strings, so a misplaced connection string
//! or token cannot leak through an error message.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    ffi::OsString,
    fmt, fs,
    io::{self, Read},
    path::{Path, PathBuf},
};

use figment::{
    error::{Actual, Kind},
    providers::{Format, Toml},
    value::{Dict, Map, Value},
    Figment, Metadata, Profile, Provider,
};

use super::{secret::redact_text, Config, Secret};

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "MONGO_SYNCD_";
/// Separator between nesting levels in environment variable names (`SOURCE__URI`).
pub const ENV_SEPARATOR: &str = "__";

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Key path, e.g. `conflict.rules[1].field`.
    pub field: String,
    /// What is wrong, and where the value came from when that helps.
    pub constraint: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.constraint)
    }
}

/// Why a configuration could not be loaded. Messages never contain secret values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file itself could not be read.
    #[error("{}: cannot read config file: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML.
    #[error("{origin}: invalid TOML at line {line}, column {column}: {message}")]
    Syntax {
        /// The file (or `config text`).
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message (without the source line, which could hold a secret).
        message: String,
    },
    /// A `uri_file` / `token_file` could not be read.
    #[error("{field}: cannot read {}: {source}", path.display())]
    SecretFile {
        /// The key naming the file.
        field: String,
        /// The file.
        path: PathBuf,
        /// The I/O error (never the contents).
        #[source]
        source: io::Error,
    },
    /// Keys with wrong types, unknown keys, or values that fail validation.
    #[error("{}", DisplayErrors(errors))]
    Invalid {
        /// One entry per problem.
        errors: Vec<FieldError>,
    },
}

struct DisplayErrors<'a>(&'a [FieldError]);

impl fmt::Display for DisplayErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// A single invalid key.
    pub fn invalid(field: impl Into<String>, constraint: impl Into<String>) -> Self {
        ConfigError::Invalid {
            errors: vec![FieldError {
                field: field.into(),
                constraint: constraint.into(),
            }],
        }
    }

    /// The key path of the (first) problem, if the error concerns a key.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::SecretFile { field, .. } => Some(field),
            ConfigError::Invalid { errors } => errors.first().map(|e| e.field.as_str()),
            ConfigError::ReadFile { .. } | ConfigError::Syntax { .. } => None,
        }
    }

    /// Every key path this error concerns.
    pub fn fields(&self) -> Vec<&str> {
        match self {
            ConfigError::Invalid { errors } => errors.iter().map(|e| e.field.as_str()).collect(),
            other => other.field().into_iter().collect(),
        }
    }

    /// Prefixes key paths with a section name (`uri` → `source.uri`).
    pub fn prefixed(self, section: &str) -> Self {
        match self {
            ConfigError::SecretFile {
                field,
                path,
                source,
            } => ConfigError::SecretFile {
                field: format!("{section}.{field}"),
                path,
                source,
            },
            ConfigError::Invalid { errors } => ConfigError::Invalid {
                errors: errors
                    .into_iter()
                    .map(|e| FieldError {
                        field: format!("{section}.{}", e.field),
                        constraint: e.constraint,
                    })
                    .collect(),
            },
            other => other,
        }
    }
}

/// Loads, resolves and validates the config file at `path`, layered with the process's
/// `MONGO_SYNCD_*` environment variables.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, process_env()?)
}

/// Like [`load`], with an explicit environment (for tests; no process state is read).
pub fn load_with_env<I, K, V>(path: &Path, env: I) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let text = fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
    load_inner(&text, &path.display().to_string(), &base_dir, env)
}

/// Loads TOML text without any environment (relative secret-file paths resolve against the
/// working directory).
pub fn load_from_str(text: &str) -> Result<Config, ConfigError> {
    load_from_str_with_env(text, std::iter::empty::<(String, String)>())
}

/// Loads TOML text layered with an explicit environment.
pub fn load_from_str_with_env<I, K, V>(text: &str, env: I) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    load_inner(text, "config text", Path::new(""), env)
}

/// The `MONGO_SYNCD_*` variables of this process.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        let value = value.into_string().map_err(|_: OsString| {
            ConfigError::invalid(
                env_key(name).unwrap_or_else(|| name.to_owned()),
                format!("environment variable {name} is not valid UTF-8"),
            )
        })?;
        vars.push((name.to_owned(), value));
    }
    Ok(vars)
}

/// `MONGO_SYNCD_APPLY__BATCH_MAX_EVENTS` → `apply.batch_max_events`.
fn env_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let parts: Vec<String> = rest
        .split(ENV_SEPARATOR)
        .map(str::to_ascii_lowercase)
        .collect();
    if parts.iter().any(String::is_empty) {
        return None;
    }
    Some(parts.join("."))
}

/// One environment variable as a figment provider, so errors can name the variable.
struct EnvVar {
    name: String,
    key: String,
    value: String,
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        // Parsed like figment's own `Env` provider: `5` is a number, `[..]` an array, `true` a
        // boolean, anything else a string.
        let value: Value = self
            .value
            .parse()
            .unwrap_or_else(|never: Infallible| match never {});
        let dict = match figment::util::nest(&self.key, value) {
            Value::Dict(_, dict) => dict,
            _ => Dict::new(),
        };
        Ok(Profile::Default.collect(dict))
    }
}

fn load_inner<I, K, V>(
    text: &str,
    origin: &str,
    base_dir: &Path,
    env: I,
) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    // Syntax first, with our own message: the TOML parser's rendering quotes the offending line,
    // which may be a connection string with a password.
    if let Err(e) = text.parse::<toml::Table>() {
        let (line, column) = e
            .span()
            .map(|span| line_col(text, span.start))
            .unwrap_or((0, 0));
        return Err(ConfigError::Syntax {
            origin: origin.to_owned(),
            line,
            column,
            message: redact_text(e.message().trim()).replace('\n', "; "),
        });
    }

    let mut figment = Figment::new().merge(Toml::string(text));
    // key path → variable name, to say where a bad value came from.
    let mut env_keys: BTreeMap<String, String> = BTreeMap::new();
    let mut env_errors = Vec::new();
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, value) in vars {
        match env_key(&name) {
            Some(key) => {
                env_keys.insert(key.clone(), name.clone());
                figment = figment.merge(EnvVar { name, key, value });
            }
            None => env_errors.push(FieldError {
                field: name.clone(),
                constraint: format!(
                    "environment variable {name} does not name a key (use {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>)"
                ),
            }),
        }
    }
    if !env_errors.is_empty() {
        return Err(ConfigError::Invalid { errors: env_errors });
    }

    let mut config: Config = figment
        .extract()
        .map_err(|e| from_figment(e, &env_keys, origin))?;

    resolve_secret_files(&mut config, base_dir)?;
    config.validate()?;
    Ok(config)
}

/// Reads `uri_file` / `token_file` (contents trimmed). Files are only read when the matching
/// inline key is unset; having both is reported by validation.
fn resolve_secret_files(config: &mut Config, base_dir: &Path) -> Result<(), ConfigError> {
    let mut warnings = Vec::new();
    for (section, endpoint) in [
        ("source", &mut config.source),
        ("destination", &mut config.destination),
    ] {
        if let (None, Some(file)) = (&endpoint.uri, &endpoint.uri_file) {
            let path = base_dir.join(file);
            endpoint.uri_from_file = Some(read_secret_file(
                &format!("{section}.uri_file"),
                &path,
                &mut warnings,
            )?);
            endpoint.uri_file = Some(path);
        }
    }
    if let (None, Some(file)) = (&config.http.token, &config.http.token_file) {
        let path = base_dir.join(file);
        config.http.token_from_file =
            Some(read_secret_file("http.token_file", &path, &mut warnings)?);
        config.http.token_file = Some(path);
    }
    config.warnings.extend(warnings);
    Ok(())
}

/// Largest `uri_file` / `token_file` read: a connection string or token is far smaller, and a
/// cap keeps `uri_file = "/dev/zero"` (or a log file named by mistake) from exhausting memory.
pub const MAX_SECRET_FILE_BYTES: usize = 64 * 1024;

fn read_secret_file(
    field: &str,
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<Secret<String>, ConfigError> {
    let io_error = |source| ConfigError::SecretFile {
        field: field.to_owned(),
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() > MAX_SECRET_FILE_BYTES {
        return Err(ConfigError::invalid(
            field,
            format!(
                "{} is larger than {MAX_SECRET_FILE_BYTES} bytes; it must hold only the secret",
                path.display()
            ),
        ));
    }
    let contents = String::from_utf8(bytes).map_err(|_| {
        ConfigError::invalid(field, format!("{} is not valid UTF-8", path.display()))
    })?;
    if let Some(warning) = readable_by_others(field, path) {
        warnings.push(warning);
    }
    let trimmed = contents.trim();
    if trimmed.is_empty() {
        return Err(ConfigError::invalid(
            field,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(trimmed.to_owned()))
}

/// A warning when the credential file at `path` can be read by its group or by others.
#[cfg(unix)]
fn readable_by_others(field: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).ok()?;
    let mode = meta.permissions().mode();
    // Character devices and pipes (`/dev/stdin`, systemd's credential sockets) are not files
    // an operator can tighten.
    if !meta.is_file() || mode & 0o044 == 0 {
        return None;
    }
    let who = match (mode & 0o040 != 0, mode & 0o004 != 0) {
        (true, true) => "its group and by others",
        (true, false) => "its group",
        _ => "others",
    };
    Some(format!(
        "{field}: {} is readable by {who} (mode {:04o}); it holds a credential: chmod 600 it",
        path.display(),
        mode & 0o7777
    ))
}

#[cfg(not(unix))]
fn readable_by_others(_field: &str, _path: &Path) -> Option<String> {
    None
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// `["conflict", "rules", "0", "field"]` → `conflict.rules[0].field`.
fn format_path<S: AsRef<str>>(segments: &[S]) -> String {
    let mut out = String::new();
    for segment in segments {
        let segment = segment.as_ref();
        if !out.is_empty() && segment.parse::<usize>().is_ok() {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// The path of `key` inside the table at `path` (figment sometimes already ends the path with
/// the key itself).
fn field_with_key(segments: &[String], path: &str, key: &str) -> String {
    if segments.last().map(String::as_str) == Some(key) {
        path.to_owned()
    } else if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// serde's "struct EndpointConfig" means "a table" to someone writing TOML.
fn describe_expected(expected: &str) -> String {
    if expected.starts_with("struct ") || expected == "a map" || expected.starts_with("map") {
        "a table".to_owned()
    } else {
        expected.to_owned()
    }
}

/// Describes a value without echoing strings (which may be secrets).
fn describe(actual: &Actual) -> String {
    match actual {
        Actual::Str(_) => "a string".to_owned(),
        Actual::Char(_) => "a character".to_owned(),
        Actual::Bytes(_) => "bytes".to_owned(),
        Actual::Other(_) => "another type".to_owned(),
        other => other.to_string(),
    }
}

fn from_figment(
    err: figment::Error,
    env_keys: &BTreeMap<String, String>,
    origin: &str,
) -> ConfigError {
    let mut errors = Vec::new();
    for e in err {
        let path = format_path(&e.path);
        let (field, message) = match &e.kind {
            Kind::UnknownField(name, expected) => (
                field_with_key(&e.path, &path, name),
                format!("unknown key; expected one of: {}", expected.join(", ")),
            ),
            Kind::MissingField(name) => {
                (field_with_key(&e.path, &path, name), "required".to_owned())
            }
            Kind::InvalidType(actual, expected) => (
                path,
                format!(
                    "expected {}, found {}",
                    describe_expected(expected),
                    describe(actual)
                ),
            ),
            Kind::InvalidValue(actual, expected) => (
                path,
                format!("invalid value ({}), expected {expected}", describe(actual)),
            ),
            Kind::UnknownVariant(found, expected) => (
                path,
                format!(
                    "unknown value {found:?}; expected one of: {}",
                    expected
                        .iter()
                        .map(|v| format!("{v:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Kind::Message(message) => (path, redact_text(message)),
            other => (path, redact_text(&other.to_string())),
        };
        let source = origin_of(&field, env_keys, origin);
        errors.push(FieldError {
            field,
            constraint: format!("{message} ({source})"),
        });
    }
    ConfigError::Invalid { errors }
}

/// Names where the value at `field` came from: the most specific environment variable that
/// sets it or one of its parents, else the file.
fn origin_of(field: &str, env_keys: &BTreeMap<String, String>, origin: &str) -> String {
    // An unknown key (`sources`) is reported at the level where it is unknown, above the key
    // the variable set (`sources.uri`): a variable setting a key below it is the origin.
    let plain = field.split('[').next().unwrap_or(field);
    if !env_keys.contains_key(plain) {
        let below = format!("{plain}.");
        if let Some((_, name)) = env_keys.iter().find(|(key, _)| key.starts_with(&below)) {
            return format!("from environment variable {name}");
        }
    }
    let mut candidate = field;
    loop {
        // `conflict.rules[0].field` is set by a variable for `conflict.rules`.
        let plain = candidate.split('[').next().unwrap_or(candidate);
        if let Some(name) = env_keys.get(plain) {
            return format!("from environment variable {name}");
        }
        match candidate.rfind(['.', '[']) {
            Some(pos) => candidate = &candidate[..pos],
            None => return format!("in {origin}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_key_mapping() {
        assert_eq!(
            env_key("MONGO_SYNCD_SOURCE__URI").as_deref(),
            Some("source.uri")
        );
        assert_eq!(
            env_key("MONGO_SYNCD_APPLY__BATCH_MAX_EVENTS").as_deref(),
            Some("apply.batch_max_events")
        );
        assert_eq!(env_key("MONGO_SYNCD_SOURCE____URI"), None);
        assert_eq!(env_key("MONGO_SYNCD_"), None);
        assert_eq!(env_key("OTHER"), None);
    }

    #[test]
    fn path_formatting() {
        assert_eq!(
            format_path(&["conflict", "rules", "0", "field"]),
            "conflict.rules[0].field"
        );
        assert_eq!(format_path(&["source"]), "source");
        assert_eq!(format_path::<&str>(&[]), "");
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("abc", 0), (1, 1));
    }

    #[test]
    fn origin_prefers_the_environment_variable_that_set_the_key() {
        let env = BTreeMap::from([
            (
                "conflict.rules".to_owned(),
                "MONGO_SYNCD_CONFLICT__RULES".to_owned(),
            ),
            (
                "source.urii".to_owned(),
                "MONGO_SYNCD_SOURCE__URII".to_owned(),
            ),
        ]);
        assert_eq!(
            origin_of("conflict.rules[0].field", &env, "f.toml"),
            "from environment variable MONGO_SYNCD_CONFLICT__RULES"
        );
        assert_eq!(
            origin_of("source.urii", &env, "f.toml"),
            "from environment variable MONGO_SYNCD_SOURCE__URII"
        );
        assert_eq!(origin_of("source.uri", &env, "f.toml"), "in f.toml");
    }
}

//! Server-side command errors, with the codes and names real servers use
//! (`src/mongo/base/error_codes.yml`).

use std::fmt;

/// An error a command answers with: `{ok: 0, code, codeName, errmsg, errorLabels?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandError {
    pub code: i32,
    pub code_name: &'static str,
    pub message: String,
    /// Labels decided by the command itself (e.g. `TransientTransactionError`); the dispatcher
    /// adds the ones real servers compute from the code and the command context.
    pub labels: Vec<String>,
    /// Extra top-level fields (e.g. `keyPattern`/`keyValue` for duplicate keys).
    pub extra: Option<Box<bson::Document>>,
}

impl CommandError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            code_name: code_name(code),
            message: message.into(),
            labels: Vec::new(),
            extra: None,
        }
    }

    pub fn bad_value(message: impl Into<String>) -> Self {
        Self::new(codes::BAD_VALUE, message)
    }

    pub fn failed_to_parse(message: impl Into<String>) -> Self {
        Self::new(codes::FAILED_TO_PARSE, message)
    }

    pub fn type_mismatch(message: impl Into<String>) -> Self {
        Self::new(codes::TYPE_MISMATCH, message)
    }

    pub fn with_label(mut self, label: &str) -> Self {
        if !self.labels.iter().any(|l| l == label) {
            self.labels.push(label.to_string());
        }
        self
    }

    pub fn with_extra(mut self, extra: bson::Document) -> Self {
        self.extra = Some(Box::new(extra));
        self
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code_name, self.code, self.message)
    }
}

impl std::error::Error for CommandError {}

pub type CommandResult<T> = Result<T, CommandError>;

/// Error codes used by the simulator.
pub mod codes {
    pub const INTERNAL_ERROR: i32 = 1;
    pub const BAD_VALUE: i32 = 2;
    pub const NO_SUCH_KEY: i32 = 4;
    pub const HOST_UNREACHABLE: i32 = 6;
    pub const FAILED_TO_PARSE: i32 = 9;
    pub const UNAUTHORIZED: i32 = 13;
    pub const TYPE_MISMATCH: i32 = 14;
    pub const ILLEGAL_OPERATION: i32 = 20;
    pub const EMPTY_FIELD_NAME: i32 = 56;
    pub const DOTTED_FIELD_NAME: i32 = 57;
    pub const NAMESPACE_NOT_FOUND: i32 = 26;
    pub const INDEX_NOT_FOUND: i32 = 27;
    pub const PATH_NOT_VIABLE: i32 = 28;
    pub const CONFLICTING_UPDATE_OPERATORS: i32 = 40;
    pub const CURSOR_NOT_FOUND: i32 = 43;
    pub const NAMESPACE_EXISTS: i32 = 48;
    pub const NO_MATCHING_DOCUMENT: i32 = 47;
    pub const MAX_TIME_MS_EXPIRED: i32 = 50;
    pub const DOLLAR_PREFIXED_FIELD_NAME: i32 = 52;
    pub const INVALID_ID_FIELD: i32 = 53;
    pub const NOT_SINGLE_VALUE_FIELD: i32 = 54;
    pub const INVALID_DBREF: i32 = 55;
    pub const COMMAND_NOT_FOUND: i32 = 59;
    pub const IMMUTABLE_FIELD: i32 = 66;
    pub const INVALID_OPTIONS: i32 = 72;
    pub const INVALID_NAMESPACE: i32 = 73;
    pub const CANNOT_CREATE_INDEX: i32 = 67;
    pub const INDEX_OPTIONS_CONFLICT: i32 = 85;
    pub const INDEX_KEY_SPECS_CONFLICT: i32 = 86;
    pub const NETWORK_TIMEOUT: i32 = 89;
    pub const SHUTDOWN_IN_PROGRESS: i32 = 91;
    pub const WRITE_CONFLICT: i32 = 112;
    pub const COMMAND_NOT_SUPPORTED: i32 = 115;
    pub const CONFLICTING_OPERATION_IN_PROGRESS: i32 = 117;
    pub const DOCUMENT_VALIDATION_FAILURE: i32 = 121;
    pub const NOT_A_REPLICA_SET: i32 = 76;
    pub const UNKNOWN_REPL_WRITE_CONCERN: i32 = 79;
    pub const UNSATISFIABLE_WRITE_CONCERN: i32 = 100;
    pub const PRIMARY_STEPPED_DOWN: i32 = 189;
    pub const ELECTION_IN_PROGRESS: i32 = 216;
    pub const TRANSACTION_TOO_OLD: i32 = 225;
    pub const NO_SUCH_TRANSACTION: i32 = 251;
    pub const TRANSACTION_COMMITTED: i32 = 256;
    pub const INVALID_RESUME_TOKEN: i32 = 260;
    pub const EXCEEDED_TIME_LIMIT: i32 = 262;
    pub const OPERATION_NOT_SUPPORTED_IN_TRANSACTION: i32 = 263;
    pub const CHANGE_STREAM_FATAL_ERROR: i32 = 280;
    pub const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
    pub const CHECKSUM_MISMATCH: i32 = 288;
    pub const UNSUPPORTED_OP_QUERY_COMMAND: i32 = 352;
    pub const SOCKET_EXCEPTION: i32 = 9001;
    pub const NOT_WRITABLE_PRIMARY: i32 = 10107;
    pub const BSON_OBJECT_TOO_LARGE: i32 = 10334;
    pub const DUPLICATE_KEY: i32 = 11000;
    pub const INTERRUPTED_AT_SHUTDOWN: i32 = 11600;
    pub const INTERRUPTED_DUE_TO_REPL_STATE_CHANGE: i32 = 11602;
    pub const NOT_PRIMARY_NO_SECONDARY_OK: i32 = 13435;
    pub const NOT_PRIMARY_OR_SECONDARY: i32 = 13436;
    pub const CHANGE_STREAM_NOT_SUPPORTED_STAGE: i32 = 40324;
    pub const VIEW_DEPTH_LIMIT_EXCEEDED: i32 = 149;
    pub const COMMAND_NOT_SUPPORTED_ON_VIEW: i32 = 166;
    pub const OPTION_NOT_SUPPORTED_ON_VIEW: i32 = 167;
    pub const MERGE_STAGE_NO_MATCHING_DOCUMENT: i32 = 13113;
    pub const LOCATION_40415_UNKNOWN_FIELD: i32 = 40415;
}

/// The `codeName` real servers send for a code (`error_codes.yml`). Codes not in that file are
/// the numbers of `uassert`s, which the server names `"Location<code>"` (done by the reply
/// builder for the codes this answers `""` for).
pub fn code_name(code: i32) -> &'static str {
    match code {
        1 => "InternalError",
        2 => "BadValue",
        4 => "NoSuchKey",
        6 => "HostUnreachable",
        7 => "HostNotFound",
        9 => "FailedToParse",
        11 => "UserNotFound",
        13 => "Unauthorized",
        14 => "TypeMismatch",
        17 => "ProtocolError",
        18 => "AuthenticationFailed",
        20 => "IllegalOperation",
        24 => "LockTimeout",
        26 => "NamespaceNotFound",
        27 => "IndexNotFound",
        28 => "PathNotViable",
        40 => "ConflictingUpdateOperators",
        43 => "CursorNotFound",
        47 => "NoMatchingDocument",
        48 => "NamespaceExists",
        50 => "MaxTimeMSExpired",
        52 => "DollarPrefixedFieldName",
        53 => "InvalidIdField",
        54 => "NotSingleValueField",
        55 => "InvalidDBRef",
        56 => "EmptyFieldName",
        57 => "DottedFieldName",
        59 => "CommandNotFound",
        63 => "StaleShardVersion",
        64 => "WriteConcernFailed",
        66 => "ImmutableField",
        67 => "CannotCreateIndex",
        72 => "InvalidOptions",
        73 => "InvalidNamespace",
        76 => "NoReplicationEnabled",
        79 => "UnknownReplWriteConcern",
        85 => "IndexOptionsConflict",
        86 => "IndexKeySpecsConflict",
        89 => "NetworkTimeout",
        100 => "UnsatisfiableWriteConcern",
        91 => "ShutdownInProgress",
        112 => "WriteConflict",
        115 => "CommandNotSupported",
        117 => "ConflictingOperationInProgress",
        121 => "DocumentValidationFailure",
        133 => "FailedToSatisfyReadPreference",
        134 => "ReadConcernMajorityNotAvailableYet",
        136 => "CappedPositionLost",
        149 => "ViewDepthLimitExceeded",
        166 => "CommandNotSupportedOnView",
        167 => "OptionNotSupportedOnView",
        150 => "StaleEpoch",
        189 => "PrimarySteppedDown",
        216 => "ElectionInProgress",
        225 => "TransactionTooOld",
        234 => "RetryChangeStream",
        239 => "SnapshotTooOld",
        241 => "ConversionFailure",
        246 => "SnapshotUnavailable",
        251 => "NoSuchTransaction",
        256 => "TransactionCommitted",
        260 => "InvalidResumeToken",
        262 => "ExceededTimeLimit",
        263 => "OperationNotSupportedInTransaction",
        280 => "ChangeStreamFatalError",
        286 => "ChangeStreamHistoryLost",
        267 => "PreparedTransactionInProgress",
        288 => "ChecksumMismatch",
        334 => "MechanismUnavailable",
        352 => "UnsupportedOpQueryCommand",
        9001 => "SocketException",
        10107 => "NotWritablePrimary",
        10334 => "BSONObjectTooLarge",
        11000 => "DuplicateKey",
        11600 => "InterruptedAtShutdown",
        11601 => "Interrupted",
        11602 => "InterruptedDueToReplStateChange",
        13113 => "MergeStageNoMatchingDocument",
        13388 => "StaleConfig",
        13435 => "NotPrimaryNoSecondaryOk",
        13436 => "NotPrimaryOrSecondary",
        _ => "",
    }
}

/// Codes in the server's `RetriableError` category (drives `RetryableWriteError` and
/// `ResumableChangeStreamError` labels).
pub fn is_retriable_code(code: i32) -> bool {
    matches!(
        code,
        6 | 7 | 89 | 91 | 134 | 189 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436
    )
}

/// Codes in the `NetworkError` category.
pub fn is_network_code(code: i32) -> bool {
    matches!(code, 6 | 7 | 89 | 9001)
}

#[cfg(test)]
mod tests {
    use super::code_name;

    /// Every code the simulator can send that is in MongoDB's `error_codes.yml` (all codes
    /// below 10000, and the few larger ones listed) carries its codeName; the others are
    /// `uassert` locations (`Location<code>`). Scans the sources for the codes they use.
    #[test]
    fn every_emitted_code_below_the_location_range_has_a_code_name() {
        let sources = [
            include_str!("error.rs"),
            include_str!("auth.rs"),
            include_str!("changestream.rs"),
            include_str!("commands/mod.rs"),
            include_str!("commands/admin.rs"),
            include_str!("commands/crud.rs"),
            include_str!("commands/ddl.rs"),
            include_str!("commands/fields.rs"),
            include_str!("commands/lets.rs"),
            include_str!("commands/read.rs"),
            include_str!("commands/repl.rs"),
            include_str!("query/expr.rs"),
            include_str!("query/aggregate.rs"),
            include_str!("query/matcher.rs"),
            include_str!("query/projection.rs"),
            include_str!("query/update.rs"),
            include_str!("session.rs"),
            include_str!("store.rs"),
            include_str!("schema.rs"),
        ];
        let mut checked = 0;
        for src in sources {
            let mut rest = src;
            while let Some(at) = rest.find("CommandError::new(") {
                rest = &rest[at + "CommandError::new(".len()..];
                let digits: String = rest
                    .trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(code) = digits.parse::<i32>() {
                    check(code);
                    checked += 1;
                }
            }
            for line in src.lines() {
                let line = line.trim();
                if line.starts_with("pub const ") || line.starts_with("const ") {
                    if let Some(v) = line
                        .split_once(": i32 = ")
                        .and_then(|(_, v)| v.trim_end_matches(';').parse::<i32>().ok())
                    {
                        check(v);
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 80, "only {checked} codes found");
    }

    fn check(code: i32) {
        let named = [
            10107, 10334, 11000, 11600, 11601, 11602, 13388, 13435, 13436,
        ];
        if code < 10000 || named.contains(&code) {
            assert!(!code_name(code).is_empty(), "code {code} has no codeName");
        }
    }
}

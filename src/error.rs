//! One error type and one classifier (STYLE conventions 3–5, DESIGN §2.2).
//!
//! - [`SyncError`] is the daemon's error: a [`ErrorKind`] saying which area failed, a context
//!   string saying what was being done, and the source error chain.
//! - [`facts`] extracts plain [`ErrorFacts`] from a driver error; [`classify`] turns facts into an
//!   [`ErrorClass`] (pure, unit-tested on facts); [`classify_mongo`] is both together.
//! - [`policy`] decides what a worker does after a failure: a [`RetryDirective`].
//! - [`Backoff`] is the capped, full-jitter, cancellable retry sleep.
//!
//! The automatic-retry list is narrow on purpose: anything not recognised is parked
//! (`RetryDirective::Park`), never retried in a loop, so unknown failures become visible instead
//! of hammering a cluster.

use std::{error::Error as StdError, fmt, time::Duration};

use mongodb::error::{ErrorKind as DriverErrorKind, WriteFailure};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::exit;

/// Which area of the daemon failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    // --- configuration and identity (process-fatal) ---
    /// The configuration is invalid (exit 78).
    Config,
    /// The source is not the deployment the checkpoints belong to (exit 78, DESIGN §2.1).
    SourceIdentityMismatch,
    /// A deployment refused our credentials (exit 77).
    Authentication,
    /// The destination was wiped or replaced while running (DESIGN §2.10): the supervisor
    /// follows `sync.on_destination_reset`; the worker itself just stops.
    DestinationReset,
    /// A copy, force-sync or repair would delete more than `sync.max_delete_fraction` of the
    /// namespace (DESIGN §2.10): parked until an operator confirms.
    MassDeleteGuard,

    // --- source ---
    /// Could not reach the source.
    SourceConnection,
    /// A read from the source failed (find, aggregate, getMore, hello).
    SourceRead,
    /// The change stream's resume point is no longer in the oplog.
    ChangeStreamHistoryLost,
    /// The change stream was invalidated (drop, rename, dropDatabase of its namespace).
    ChangeStreamInvalidated,

    // --- destination ---
    /// Could not reach the destination.
    DestinationConnection,
    /// A write to the destination failed as a whole.
    DestinationWrite,
    /// The destination rejected one document (validator, size, unique index).
    DocumentRejected,
    /// Reading or writing a checkpoint failed.
    Checkpoint,

    // --- runtime ---
    /// A worker task panicked.
    WorkerPanicked,
    /// The operation was cancelled by shutdown.
    Cancelled,
    /// A condition the code relies on did not hold: a bug.
    InvariantViolated,
    /// The destination collection's collation differs from the source collection's.
    CollationMismatch,
}

impl ErrorKind {
    /// A short, stable, lowercase name for logs and status (bounded: safe as a label).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::SourceIdentityMismatch => "source_identity_mismatch",
            ErrorKind::Authentication => "authentication",
            ErrorKind::DestinationReset => "destination_reset",
            ErrorKind::MassDeleteGuard => "mass_delete_guard",
            ErrorKind::SourceConnection => "source_connection",
            ErrorKind::SourceRead => "source_read",
            ErrorKind::ChangeStreamHistoryLost => "change_stream_history_lost",
            ErrorKind::ChangeStreamInvalidated => "change_stream_invalidated",
            ErrorKind::DestinationConnection => "destination_connection",
            ErrorKind::DestinationWrite => "destination_write",
            ErrorKind::DocumentRejected => "document_rejected",
            ErrorKind::Checkpoint => "checkpoint",
            ErrorKind::WorkerPanicked => "worker_panicked",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::InvariantViolated => "invariant_violated",
            ErrorKind::CollationMismatch => "collation_mismatch",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The daemon's error: what area failed, what we were doing, and why.
///
/// Attach the cause with [`SyncError::with_source`] instead of formatting it into `context`, so
/// the chain (and, for driver errors, the classification) survives.
pub struct SyncError {
    /// The failing area.
    pub kind: ErrorKind,
    /// What was being done, lowercase prose (`"applying batch"`). No document values.
    pub context: String,
    /// The underlying error.
    pub source: Option<Box<dyn StdError + Send + Sync>>,
}

impl SyncError {
    /// An error without an underlying cause.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// A driver error. The kind is refined by classification: authentication failures become
    /// [`ErrorKind::Authentication`], history loss [`ErrorKind::ChangeStreamHistoryLost`],
    /// document rejections [`ErrorKind::DocumentRejected`]; otherwise `area` is kept.
    pub fn mongo(area: ErrorKind, context: impl Into<String>, err: mongodb::error::Error) -> Self {
        let kind = match classify_mongo(&err) {
            ErrorClass::Fatal(FatalKind::Auth) => ErrorKind::Authentication,
            ErrorClass::Fatal(FatalKind::Config) => ErrorKind::Config,
            ErrorClass::HistoryLost => ErrorKind::ChangeStreamHistoryLost,
            ErrorClass::Invalidated => ErrorKind::ChangeStreamInvalidated,
            ErrorClass::Document => ErrorKind::DocumentRejected,
            ErrorClass::Transient | ErrorClass::Other => area,
        };
        Self::with_source(kind, context, err)
    }

    /// The driver error at the root of this error, if any.
    pub fn mongo_source(&self) -> Option<&mongodb::error::Error> {
        let mut current: Option<&(dyn StdError + 'static)> = self
            .source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static));
        while let Some(err) = current {
            if let Some(mongo) = err.downcast_ref::<mongodb::error::Error>() {
                return Some(mongo);
            }
            current = err.source();
        }
        None
    }
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The cause is reachable through `source()`; loggers that print chains show it.
        // The plain Display stays short: "<kind>: <context>".
        write!(f, "{}: {}", self.kind, self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {}", crate::config::redact_text(&source.to_string()))?;
        }
        Ok(())
    }
}

impl fmt::Debug for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncError")
            .field("kind", &self.kind)
            .field("context", &self.context)
            .field(
                "source",
                &self
                    .source
                    .as_ref()
                    .map(|s| crate::config::redact_text(&s.to_string())),
            )
            .finish()
    }
}

impl StdError for SyncError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<crate::config::ConfigError> for SyncError {
    fn from(err: crate::config::ConfigError) -> Self {
        SyncError::with_source(ErrorKind::Config, "invalid configuration", err)
    }
}

// ---------------------------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------------------------

/// Why a failure is fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalKind {
    /// Credentials refused or privileges missing (exit 77).
    Auth,
    /// The configuration cannot work (exit 78), e.g. an invalid TLS setup.
    Config,
}

/// What kind of failure a driver error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff: network, timeouts, elections, retryable labels.
    Transient,
    /// The resume point is gone from the oplog: re-copy (or park).
    HistoryLost,
    /// One document was rejected by the destination: dead-letter it and continue.
    Document,
    /// Stop the process.
    Fatal(FatalKind),
    /// The change stream cannot be resumed from this token (invalidated): restart the stream.
    Invalidated,
    /// Not recognised: parked, not retried (STYLE convention 3).
    Other,
}

/// Plain facts about a driver error; [`classify`] decides on these alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFacts {
    /// Server error code of a command error, or of a write concern error.
    pub code: Option<i32>,
    /// Server code name.
    pub code_name: Option<String>,
    /// Error labels (`RetryableWriteError`, `ResumableChangeStreamError`, ...), including those
    /// of nested errors.
    pub labels: Vec<String>,
    /// I/O failure (connection reset, refused, ...) or pool cleared.
    pub is_network: bool,
    /// A timeout: I/O timeout, `MaxTimeMSExpired` (50), `NetworkTimeout` (89),
    /// `ExceededTimeLimit` (262).
    pub is_timeout: bool,
    /// The driver failed to authenticate.
    pub is_auth: bool,
    /// No server could be selected within `serverSelectionTimeoutMS`.
    pub is_server_selection: bool,
    /// The connection pool was cleared under the operation.
    pub is_pool_cleared: bool,
    /// DNS resolution (SRV/TXT lookup) failed.
    pub is_dns: bool,
    /// The driver rejected its own TLS configuration.
    pub is_tls_config: bool,
    /// Codes of individual write errors (per document).
    pub write_error_codes: Vec<i32>,
    /// For a duplicate-key write error (11000): the index it hit, when known (from the reply's
    /// `keyPattern`, else from the server's message `... index: <name> dup key ...`).
    pub duplicate_key_index: Option<String>,
    /// Code 280 with "resume token was not found": the token fell off the oplog.
    pub resume_token_not_found: bool,
}

/// Codes retried with backoff: the driver's retryable-read set (6 HostUnreachable,
/// 7 HostNotFound, 89 NetworkTimeout, 91 ShutdownInProgress, 134 ReadConcernMajorityNotAvailableYet,
/// 189 PrimarySteppedDown, 262 ExceededTimeLimit, 9001 SocketException, 10107 NotWritablePrimary,
/// 11600 InterruptedAtShutdown, 11602 InterruptedDueToReplStateChange, 13435
/// NotPrimaryNoSecondaryOk, 13436 NotPrimaryOrSecondary) plus 43 CursorNotFound, 50
/// MaxTimeMSExpired, 64 WriteConcernFailed (wtimeout), 112 WriteConflict, 11601 Interrupted.
pub const TRANSIENT_CODES: &[i32] = &[
    6, 7, 43, 50, 64, 89, 91, 112, 134, 189, 262, 9001, 10107, 11600, 11601, 11602, 13435, 13436,
];

/// Labels that mark an error as safe to retry.
pub const TRANSIENT_LABELS: &[&str] = &[
    "RetryableWriteError",
    "ResumableChangeStreamError",
    "TransientTransactionError",
    "RetryableError",
    "SystemOverloadedError",
];

/// 286 ChangeStreamHistoryLost; 136 CappedPositionLost (the oplog wrapped under the cursor).
pub const HISTORY_LOST_CODES: &[i32] = &[136, 286];

/// 280 ChangeStreamFatalError: history lost only with "resume token was not found".
pub const CHANGE_STREAM_FATAL: i32 = 280;

/// The parked reason of a namespace the mass-delete guard paused (`guard`), until an operator
/// confirms the deletions.
pub const MASS_DELETE_PARK_REASON: &str = "mass_delete_guard";

/// 260 InvalidResumeToken: e.g. `resumeAfter` an invalidate event; the stream must be restarted
/// with `startAfter`.
pub const INVALID_RESUME_TOKEN: i32 = 260;

/// Write errors that concern one document: 2 BadValue, 52 DollarPrefixedFieldName,
/// 53 InvalidIdField, 55 InvalidDBRef, 56 EmptyFieldName, 57 DottedFieldName,
/// 121 DocumentValidationFailure, 10334 BSONObjectTooLarge, 17280 KeyTooLong,
/// 17419/17420 document too large after update.
pub const DOCUMENT_CODES: &[i32] = &[2, 52, 53, 55, 56, 57, 121, 10334, 17280, 17419, 17420];

/// 11000 DuplicateKey.
pub const DUPLICATE_KEY: i32 = 11000;

/// 18 AuthenticationFailed, 13 Unauthorized.
pub const AUTH_CODES: &[i32] = &[13, 18];

/// 13 Unauthorized: on a namespace's command, a missing privilege (the namespace parks).
pub const UNAUTHORIZED: i32 = 13;

/// Extracts the facts [`classify`] needs from a driver error (and its nested errors).
pub fn facts(err: &mongodb::error::Error) -> ErrorFacts {
    let mut f = ErrorFacts::default();
    collect_facts(err, &mut f);
    f.labels.sort();
    f.labels.dedup();
    f
}

fn collect_facts(err: &mongodb::error::Error, f: &mut ErrorFacts) {
    f.labels.extend(err.labels().iter().cloned());
    match err.kind.as_ref() {
        DriverErrorKind::Command(c) => {
            f.code.get_or_insert(c.code);
            if f.code_name.is_none() && !c.code_name.is_empty() {
                f.code_name = Some(c.code_name.clone());
            }
            if c.code == CHANGE_STREAM_FATAL && c.message.contains("resume token was not found") {
                f.resume_token_not_found = true;
            }
        }
        DriverErrorKind::Write(WriteFailure::WriteError(w)) => {
            push_write_error(f, w.code, &w.message);
        }
        DriverErrorKind::Write(WriteFailure::WriteConcernError(wc)) => {
            f.code.get_or_insert(wc.code);
            if f.code_name.is_none() && !wc.code_name.is_empty() {
                f.code_name = Some(wc.code_name.clone());
            }
        }
        DriverErrorKind::InsertMany(e) => {
            for w in e.write_errors.iter().flatten() {
                push_write_error(f, w.code, &w.message);
            }
            if let Some(wc) = &e.write_concern_error {
                f.code.get_or_insert(wc.code);
            }
        }
        DriverErrorKind::BulkWrite(e) => {
            let mut indexed: Vec<_> = e.write_errors.iter().collect();
            indexed.sort_by_key(|(i, _)| **i);
            for (_, w) in indexed {
                push_write_error(f, w.code, &w.message);
            }
            if let Some(wc) = e.write_concern_errors.first() {
                f.code.get_or_insert(wc.code);
            }
        }
        DriverErrorKind::Io(io) => {
            f.is_network = true;
            if io.kind() == std::io::ErrorKind::TimedOut {
                f.is_timeout = true;
            }
        }
        DriverErrorKind::ConnectionPoolCleared { .. } => {
            f.is_network = true;
            f.is_pool_cleared = true;
        }
        DriverErrorKind::ServerSelection { .. } => f.is_server_selection = true,
        DriverErrorKind::Authentication { .. } => f.is_auth = true,
        DriverErrorKind::DnsResolve { .. } => f.is_dns = true,
        DriverErrorKind::InvalidTlsConfig { .. } => f.is_tls_config = true,
        _ => {}
    }
    if matches!(f.code, Some(50 | 89 | 262)) {
        f.is_timeout = true;
    }
    if f.duplicate_key_index.is_none() && f.write_error_codes.contains(&DUPLICATE_KEY) {
        f.duplicate_key_index = duplicate_key_index_from_reply(err);
    }
    // Errors wrapped by the driver (e.g. the cause of a bulk write that stopped early).
    if let Some(inner) = err
        .source()
        .and_then(|s| s.downcast_ref::<mongodb::error::Error>())
    {
        collect_facts(inner, f);
    }
}

fn push_write_error(f: &mut ErrorFacts, code: i32, message: &str) {
    f.write_error_codes.push(code);
    if code == DUPLICATE_KEY && f.duplicate_key_index.is_none() {
        f.duplicate_key_index = duplicate_key_index_from_message(message);
    }
}

/// `E11000 duplicate key error collection: db.c index: email_1 dup key: { ... }` → `email_1`.
///
/// The server reports the index name only in this message (and `keyPattern` in the raw reply),
/// so this is the one place where message text is read; nothing else is classified by text.
fn duplicate_key_index_from_message(message: &str) -> Option<String> {
    let rest = &message[message.find("index: ")? + "index: ".len()..];
    let name = rest.split_whitespace().next()?;
    Some(name.to_owned())
}

/// `keyPattern: {_id: 1}` in the reply's first duplicate-key write error → `_id_`.
fn duplicate_key_index_from_reply(err: &mongodb::error::Error) -> Option<String> {
    let reply = err.server_response()?;
    let write_errors = reply.get_array("writeErrors").ok()?;
    for entry in write_errors.into_iter().flatten() {
        let Some(doc) = entry.as_document() else {
            continue;
        };
        if doc.get_i32("code").ok() != Some(DUPLICATE_KEY) {
            continue;
        }
        let pattern = doc.get_document("keyPattern").ok()?;
        let keys: Vec<&str> = pattern.iter().flatten().map(|(k, _)| k.as_str()).collect();
        if keys == ["_id"] {
            return Some("_id_".to_owned());
        }
        return Some(keys.join("_"));
    }
    None
}

/// Classifies facts. Order: authentication, history lost, transient, document, invalidated,
/// configuration; anything else is [`ErrorClass::Other`].
///
/// A duplicate key on the `_id_` index is transient (two upserts of one `_id` raced; the retry
/// matches the existing document). Callers whose policy gives E11000 on `_id_` a meaning
/// (destination-wins, newest-wins) handle it before classifying. A duplicate key on any other
/// index is a document error; on an unknown index it is `Other`.
pub fn classify(f: &ErrorFacts) -> ErrorClass {
    if f.is_auth || f.code.is_some_and(|c| AUTH_CODES.contains(&c)) {
        return ErrorClass::Fatal(FatalKind::Auth);
    }
    if f.code.is_some_and(|c| HISTORY_LOST_CODES.contains(&c)) || f.resume_token_not_found {
        return ErrorClass::HistoryLost;
    }
    let has_label = |l: &str| f.labels.iter().any(|x| x == l);
    if f.is_network
        || f.is_timeout
        || f.is_server_selection
        || f.is_pool_cleared
        || f.is_dns
        || f.code.is_some_and(|c| TRANSIENT_CODES.contains(&c))
        || TRANSIENT_LABELS.iter().any(|l| has_label(l))
    {
        return ErrorClass::Transient;
    }
    if !f.write_error_codes.is_empty() {
        let on_id = f.duplicate_key_index.as_deref() == Some("_id_");
        let mut all_document = true;
        for &code in &f.write_error_codes {
            let class = match code {
                DUPLICATE_KEY if on_id => ErrorClass::Transient,
                DUPLICATE_KEY if f.duplicate_key_index.is_some() => ErrorClass::Document,
                DUPLICATE_KEY => ErrorClass::Other,
                c if TRANSIENT_CODES.contains(&c) => ErrorClass::Transient,
                c if DOCUMENT_CODES.contains(&c) => ErrorClass::Document,
                _ => ErrorClass::Other,
            };
            match class {
                ErrorClass::Transient => return ErrorClass::Transient,
                ErrorClass::Document => {}
                _ => all_document = false,
            }
        }
        if all_document && f.code.is_none() {
            return ErrorClass::Document;
        }
        return ErrorClass::Other;
    }
    if f.code == Some(INVALID_RESUME_TOKEN) {
        return ErrorClass::Invalidated;
    }
    if f.is_tls_config {
        return ErrorClass::Fatal(FatalKind::Config);
    }
    ErrorClass::Other
}

/// Whether one statement's write error (an entry of a bulk reply's `writeErrors`) is transient,
/// by the same [`classify`] a failed command gets: 11602, 189, 91, 10107, 112, ... inside
/// `writeErrors` retry like the command-level codes (issue 9).
pub fn is_transient_write_error(code: i32) -> bool {
    let facts = ErrorFacts {
        write_error_codes: vec![code],
        ..ErrorFacts::default()
    };
    matches!(classify(&facts), ErrorClass::Transient)
}

/// [`classify`] of [`facts`].
pub fn classify_mongo(err: &mongodb::error::Error) -> ErrorClass {
    classify(&facts(err))
}

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// What the supervisor does after a worker fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryDirective {
    /// Restart after a [`Backoff`] sleep (counts towards `supervisor.max_restarts`).
    Backoff,
    /// Re-run the initial copy for the namespace (the supervisor parks instead when
    /// `sync.on_history_lost = "park"` or after 2 consecutive history-lost re-copies).
    Resync,
    /// Stop the worker until force-sync or a config reload; visible in metrics and `/readyz`.
    Park {
        /// Bounded, label-safe reason (`unclassified`, `worker_panicked`, ...).
        reason: &'static str,
        /// What the operator should do.
        solution: String,
    },
    /// Stop the process with this exit code.
    Fatal {
        /// See [`crate::exit`].
        exit_code: u8,
    },
    /// Not a failure: the worker was cancelled by shutdown; do not restart it.
    Stop,
}

/// Decides how to react to a worker failure. The only place that does.
pub fn policy(err: &SyncError) -> RetryDirective {
    match err.kind {
        ErrorKind::Config | ErrorKind::SourceIdentityMismatch => RetryDirective::Fatal {
            exit_code: exit::INVALID_CONFIG,
        },
        // 13 Unauthorized on a command of one namespace (a missing role on one database, a
        // destination user without write access to one collection) parks that namespace;
        // only a refused handshake (authentication) stops the process.
        ErrorKind::Authentication
        | ErrorKind::SourceRead
        | ErrorKind::DestinationWrite
        | ErrorKind::Checkpoint
            if err.mongo_source().map(facts).is_some_and(|f| {
                !f.is_auth
                    && (f.code == Some(UNAUTHORIZED) || f.write_error_codes.contains(&UNAUTHORIZED))
            }) =>
        {
            RetryDirective::Park {
                reason: "unauthorized",
                solution: format!(
                    "{} was refused with code 13 (Unauthorized): grant the daemon's user the \
                     roles it needs on this namespace (DESIGN §2.1), then force-sync the namespace",
                    err.kind
                ),
            }
        }
        ErrorKind::Authentication => RetryDirective::Fatal {
            exit_code: exit::AUTH_REFUSED,
        },
        // One worker's broken invariant (e.g. its checkpoint would move backwards) stops that
        // worker only (DESIGN §2.2).
        ErrorKind::InvariantViolated => RetryDirective::Park {
            reason: "invariant_violated",
            solution:
                "a condition mongo-syncd relies on did not hold for this namespace (read the \
                       logged error: e.g. its checkpoint would have moved backwards because \
                       another process wrote it); fix the cause, then force-sync the namespace"
                    .to_owned(),
        },
        ErrorKind::CollationMismatch => RetryDirective::Park {
            reason: "collation_mismatch",
            solution: "re-create the destination collection with the source collection's \
                       collation (or set sync.on_collation_mismatch = \"recreate\"), then \
                       force-sync the namespace"
                .to_owned(),
        },
        // The supervisor, told by the identity watch, stops every worker and follows
        // `sync.on_destination_reset`: the worker must not restart on its own.
        ErrorKind::Cancelled | ErrorKind::DestinationReset => RetryDirective::Stop,
        ErrorKind::MassDeleteGuard => RetryDirective::Park {
            reason: MASS_DELETE_PARK_REASON,
            solution: "check why the source has so many fewer documents than the destination; \
                       if the deletions are intended, confirm them with POST /api/v1/confirm \
                       {\"namespaces\": [\"<db.coll>\"]} or a force-sync naming the namespace"
                .to_owned(),
        },
        ErrorKind::ChangeStreamHistoryLost => RetryDirective::Resync,
        ErrorKind::ChangeStreamInvalidated
        | ErrorKind::SourceConnection
        | ErrorKind::DestinationConnection => RetryDirective::Backoff,
        ErrorKind::WorkerPanicked => RetryDirective::Park {
            reason: "worker_panicked",
            solution: "the worker panicked, which is a bug: report it with the log lines above, \
                       then force-sync the namespace to restart it"
                .to_owned(),
        },
        ErrorKind::DocumentRejected => RetryDirective::Park {
            reason: "document_rejected",
            solution:
                "a destination rejection could not be dead-lettered; check the destination's \
                       validators and unique indexes and that the metadata database is writable, \
                       then force-sync the namespace"
                    .to_owned(),
        },
        ErrorKind::SourceRead | ErrorKind::DestinationWrite | ErrorKind::Checkpoint => {
            match err.mongo_source().map(classify_mongo) {
                Some(ErrorClass::Transient) => RetryDirective::Backoff,
                Some(ErrorClass::HistoryLost) => RetryDirective::Resync,
                Some(ErrorClass::Invalidated) => RetryDirective::Backoff,
                Some(ErrorClass::Fatal(FatalKind::Auth)) => RetryDirective::Fatal {
                    exit_code: exit::AUTH_REFUSED,
                },
                Some(ErrorClass::Fatal(FatalKind::Config)) => RetryDirective::Fatal {
                    exit_code: exit::INVALID_CONFIG,
                },
                Some(ErrorClass::Document) => RetryDirective::Park {
                    reason: "document_rejected",
                    solution: "the destination rejected a document outside the dead-letter path; \
                               check its validators and unique indexes, then force-sync the namespace"
                        .to_owned(),
                },
                Some(ErrorClass::Other) | None => RetryDirective::Park {
                    reason: "unclassified",
                    solution: format!(
                        "{} failed with an error mongo-syncd does not retry automatically; \
                         read the logged error, fix the cause, then force-sync the namespace",
                        err.kind
                    ),
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------------

/// First retry ceiling: long enough for a dropped connection to be re-established, short
/// enough that a blip costs well under a second of lag.
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 500;

/// Exponential backoff with full jitter, capped: the n-th delay (from 0) is uniform in
/// `[0, min(cap, base · 2ⁿ)]`. Every sleep is cancellable.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    /// A backoff starting at `base`, never sleeping longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self::with_rng(base, cap, StdRng::from_rng(&mut rand::rng()))
    }

    /// Deterministic jitter, for tests.
    pub fn with_seed(base: Duration, cap: Duration, seed: u64) -> Self {
        Self::with_rng(base, cap, StdRng::seed_from_u64(seed))
    }

    fn with_rng(base: Duration, cap: Duration, rng: StdRng) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            rng,
        }
    }

    /// [`DEFAULT_BACKOFF_BASE_MS`] capped at `supervisor.max_backoff_seconds`.
    pub fn from_config(cfg: &crate::config::SupervisorConfig) -> Self {
        Self::new(
            Duration::from_millis(DEFAULT_BACKOFF_BASE_MS),
            Duration::from_secs(cfg.max_backoff_seconds),
        )
    }

    /// How many delays have been handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Call after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The upper bound of the next delay: `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay (and count the attempt).
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let max_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.random_range(0..=max_ms))
    }

    /// Sleeps for the next delay. Returns `false` (at once) when `cancel` fires first.
    pub async fn sleep(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            biased;
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests;

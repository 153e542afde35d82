//! Classifier, policy and backoff tests. The classifier is tested on plain [`ErrorFacts`];
//! `facts()` is tested on driver errors built without a server (deserialised from server-shaped
//! replies, or produced by a real driver against a closed port).

use std::{io, sync::Arc, time::Duration};

use bson::doc;
use mongodb::error::{
    BulkWriteError, CommandError, Error as MongoError, ErrorKind as DriverKind, InsertManyError,
    WriteConcernError, WriteError, WriteFailure,
};
use tokio::time::Instant;

use super::*;

fn code(code: i32) -> ErrorFacts {
    ErrorFacts {
        code: Some(code),
        ..ErrorFacts::default()
    }
}

fn write_errors(codes: &[i32], dup_index: Option<&str>) -> ErrorFacts {
    ErrorFacts {
        write_error_codes: codes.to_vec(),
        duplicate_key_index: dup_index.map(str::to_owned),
        ..ErrorFacts::default()
    }
}

fn label(label: &str) -> ErrorFacts {
    ErrorFacts {
        labels: vec![label.to_owned()],
        ..ErrorFacts::default()
    }
}

#[test]
fn transient_codes_and_labels() {
    for c in [
        6, 7, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 112, 43, 11601, 50,
    ] {
        assert_eq!(classify(&code(c)), ErrorClass::Transient, "code {c}");
    }
    for l in [
        "RetryableWriteError",
        "ResumableChangeStreamError",
        "TransientTransactionError",
    ] {
        assert_eq!(classify(&label(l)), ErrorClass::Transient, "label {l}");
    }
    let flags: [fn(&mut ErrorFacts); 6] = [
        |f| f.is_network = true,
        |f| f.is_timeout = true,
        |f| f.is_server_selection = true,
        |f| f.is_pool_cleared = true,
        |f| f.is_dns = true,
        |f| f.write_error_codes = vec![112],
    ];
    for set in flags {
        let mut f = ErrorFacts::default();
        set(&mut f);
        assert_eq!(classify(&f), ErrorClass::Transient, "{f:?}");
    }
}

#[test]
fn history_lost() {
    assert_eq!(classify(&code(286)), ErrorClass::HistoryLost);
    assert_eq!(classify(&code(136)), ErrorClass::HistoryLost);
    let token_gone = ErrorFacts {
        code: Some(280),
        resume_token_not_found: true,
        ..ErrorFacts::default()
    };
    assert_eq!(classify(&token_gone), ErrorClass::HistoryLost);
    // 280 for another reason is not history loss, and not retried blindly either.
    assert_eq!(classify(&code(280)), ErrorClass::Other);
    // A resumable label on a history-lost error does not make it transient.
    let mut labelled = code(286);
    labelled.labels = vec!["ResumableChangeStreamError".into()];
    assert_eq!(classify(&labelled), ErrorClass::HistoryLost);
}

#[test]
fn document_errors() {
    for c in [121, 10334, 17419, 17420, 2, 52, 53, 55, 56, 57, 17280] {
        assert_eq!(
            classify(&write_errors(&[c], None)),
            ErrorClass::Document,
            "write error {c}"
        );
    }
    assert_eq!(
        classify(&write_errors(&[11000], Some("email_1"))),
        ErrorClass::Document
    );
    assert_eq!(
        classify(&write_errors(&[121, 11000], Some("sku_1"))),
        ErrorClass::Document
    );
    // The same codes as a whole-command error are not about one document.
    assert_eq!(classify(&code(2)), ErrorClass::Other);
    assert_eq!(classify(&code(10334)), ErrorClass::Other);
}

#[test]
fn duplicate_key_depends_on_the_index() {
    // Two upserts of one _id raced: retrying finds the document.
    assert_eq!(
        classify(&write_errors(&[11000], Some("_id_"))),
        ErrorClass::Transient
    );
    // Unknown index: neither retried nor dead-lettered blindly.
    assert_eq!(classify(&write_errors(&[11000], None)), ErrorClass::Other);
}

#[test]
fn mixed_write_errors() {
    // Any transient write error → retry the (idempotent) batch.
    assert_eq!(
        classify(&write_errors(&[121, 112], None)),
        ErrorClass::Transient
    );
    // A document error next to an unknown one → park, do not dead-letter the unknown.
    assert_eq!(
        classify(&write_errors(&[121, 999_999], None)),
        ErrorClass::Other
    );
    // A write concern error next to document errors → not only documents.
    let mut f = write_errors(&[121], None);
    f.code = Some(100);
    assert_eq!(classify(&f), ErrorClass::Other);
}

#[test]
fn fatal_and_other() {
    assert_eq!(classify(&code(18)), ErrorClass::Fatal(FatalKind::Auth));
    assert_eq!(classify(&code(13)), ErrorClass::Fatal(FatalKind::Auth));
    let auth = ErrorFacts {
        is_auth: true,
        // Auth wins even over network-looking facts.
        is_network: true,
        ..ErrorFacts::default()
    };
    assert_eq!(classify(&auth), ErrorClass::Fatal(FatalKind::Auth));
    let tls = ErrorFacts {
        is_tls_config: true,
        ..ErrorFacts::default()
    };
    assert_eq!(classify(&tls), ErrorClass::Fatal(FatalKind::Config));
    assert_eq!(classify(&code(260)), ErrorClass::Invalidated);
    assert_eq!(classify(&ErrorFacts::default()), ErrorClass::Other);
    assert_eq!(classify(&code(26)), ErrorClass::Other);
    assert_eq!(classify(&label("SomeNewLabel")), ErrorClass::Other);
}

// ----- facts() on driver errors -----

fn command_error(code: i32, name: &str, msg: &str) -> MongoError {
    let err: CommandError =
        bson::deserialize_from_document(doc! { "code": code, "codeName": name, "errmsg": msg })
            .unwrap();
    MongoError::from(DriverKind::Command(err))
}

fn write_error(code: i32, msg: &str) -> WriteError {
    bson::deserialize_from_document(doc! { "code": code, "errmsg": msg }).unwrap()
}

#[test]
fn facts_of_command_errors() {
    let f = facts(&command_error(
        286,
        "ChangeStreamHistoryLost",
        "history lost",
    ));
    assert_eq!(f.code, Some(286));
    assert_eq!(f.code_name.as_deref(), Some("ChangeStreamHistoryLost"));
    assert_eq!(classify(&f), ErrorClass::HistoryLost);

    let f = facts(&command_error(
        280,
        "ChangeStreamFatalError",
        "cannot resume stream; the resume token was not found. {_data: \"8263\"}",
    ));
    assert!(f.resume_token_not_found);
    assert_eq!(classify(&f), ErrorClass::HistoryLost);

    let f = facts(&command_error(
        50,
        "MaxTimeMSExpired",
        "operation exceeded time limit",
    ));
    assert!(f.is_timeout);
    assert_eq!(classify(&f), ErrorClass::Transient);

    assert_eq!(
        classify_mongo(&command_error(10107, "NotWritablePrimary", "not primary")),
        ErrorClass::Transient
    );
    assert_eq!(
        classify_mongo(&command_error(13, "Unauthorized", "not authorized on shop")),
        ErrorClass::Fatal(FatalKind::Auth)
    );
}

#[test]
fn facts_of_write_errors() {
    let dup = MongoError::from(DriverKind::Write(WriteFailure::WriteError(write_error(
        11000,
        "E11000 duplicate key error collection: shop.users index: email_1 dup key: { email: \"a@b\" }",
    ))));
    let f = facts(&dup);
    assert_eq!(f.write_error_codes, [11000]);
    assert_eq!(f.duplicate_key_index.as_deref(), Some("email_1"));
    assert_eq!(classify(&f), ErrorClass::Document);

    let dup_id = MongoError::from(DriverKind::Write(WriteFailure::WriteError(write_error(
        11000,
        "E11000 duplicate key error collection: shop.users index: _id_ dup key: { _id: 1 }",
    ))));
    assert_eq!(classify_mongo(&dup_id), ErrorClass::Transient);

    let invalid = MongoError::from(DriverKind::Write(WriteFailure::WriteError(write_error(
        121,
        "Document failed validation",
    ))));
    assert_eq!(classify_mongo(&invalid), ErrorClass::Document);
}

#[test]
fn facts_of_write_concern_errors_carry_their_labels() {
    let wc: WriteConcernError = bson::deserialize_from_document(doc! {
        "code": 91,
        "codeName": "ShutdownInProgress",
        "errmsg": "shutting down",
        "errorLabels": ["RetryableWriteError"],
    })
    .unwrap();
    let err = MongoError::from(DriverKind::Write(WriteFailure::WriteConcernError(wc)));
    let f = facts(&err);
    assert_eq!(f.code, Some(91));
    assert_eq!(f.labels, ["RetryableWriteError"]);
    assert_eq!(classify(&f), ErrorClass::Transient);
}

#[test]
fn facts_of_insert_many_and_bulk_write_errors() {
    let many: InsertManyError = bson::deserialize_from_document(doc! {
        "writeErrors": [
            { "index": 0, "code": 121, "errmsg": "Document failed validation" },
            { "index": 3, "code": 10334, "errmsg": "object too large" },
        ],
    })
    .unwrap();
    let f = facts(&MongoError::from(DriverKind::InsertMany(many)));
    assert_eq!(f.write_error_codes, [121, 10334]);
    assert_eq!(classify(&f), ErrorClass::Document);

    let mut bulk = BulkWriteError::default();
    bulk.write_errors
        .insert(4, write_error(112, "write conflict"));
    bulk.write_errors
        .insert(1, write_error(121, "Document failed validation"));
    let f = facts(&MongoError::from(DriverKind::BulkWrite(bulk)));
    assert_eq!(f.write_error_codes, [121, 112]);
    assert_eq!(classify(&f), ErrorClass::Transient);
}

#[test]
fn facts_of_io_errors() {
    let refused = MongoError::from(DriverKind::Io(Arc::new(io::Error::from(
        io::ErrorKind::ConnectionRefused,
    ))));
    let f = facts(&refused);
    assert!(f.is_network && !f.is_timeout);
    assert_eq!(classify(&f), ErrorClass::Transient);
    let timed_out = MongoError::from(DriverKind::Io(Arc::new(io::Error::from(
        io::ErrorKind::TimedOut,
    ))));
    assert!(facts(&timed_out).is_timeout);
}

/// A real driver error: server selection against a port nothing listens on.
#[tokio::test]
async fn facts_of_a_real_server_selection_timeout() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
        // dropped: the port is closed again
    };
    let client = mongodb::Client::with_uri_str(format!(
        "mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=200&connectTimeoutMS=200"
    ))
    .await
    .unwrap();
    let err = client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap_err();
    let f = facts(&err);
    assert!(f.is_server_selection, "{f:?} from {err}");
    assert_eq!(classify(&f), ErrorClass::Transient);
    let sync = SyncError::mongo(ErrorKind::SourceRead, "pinging the source", err);
    assert_eq!(sync.kind, ErrorKind::SourceRead);
    assert_eq!(policy(&sync), RetryDirective::Backoff);
}

// ----- SyncError and policy -----

#[test]
fn sync_error_refines_kind_from_the_driver_error() {
    let e = SyncError::mongo(
        ErrorKind::SourceRead,
        "reading the change stream",
        command_error(286, "ChangeStreamHistoryLost", ""),
    );
    assert_eq!(e.kind, ErrorKind::ChangeStreamHistoryLost);
    assert_eq!(policy(&e), RetryDirective::Resync);

    let e = SyncError::mongo(
        ErrorKind::DestinationWrite,
        "applying batch",
        command_error(18, "AuthenticationFailed", "auth failed"),
    );
    assert_eq!(e.kind, ErrorKind::Authentication);
    assert_eq!(policy(&e), RetryDirective::Fatal { exit_code: 77 });

    let e = SyncError::mongo(
        ErrorKind::DestinationWrite,
        "applying batch",
        command_error(10107, "NotWritablePrimary", ""),
    );
    assert_eq!(e.kind, ErrorKind::DestinationWrite);
    assert_eq!(policy(&e), RetryDirective::Backoff);
    assert!(e.mongo_source().is_some());
    assert!(
        e.to_string()
            .starts_with("destination_write: applying batch: "),
        "{e}"
    );
}

#[test]
fn policy_table() {
    let cases = [
        (ErrorKind::Config, RetryDirective::Fatal { exit_code: 78 }),
        (
            ErrorKind::SourceIdentityMismatch,
            RetryDirective::Fatal { exit_code: 78 },
        ),
        (
            ErrorKind::Authentication,
            RetryDirective::Fatal { exit_code: 77 },
        ),
        (ErrorKind::Cancelled, RetryDirective::Stop),
        (ErrorKind::DestinationReset, RetryDirective::Stop),
        (ErrorKind::ChangeStreamHistoryLost, RetryDirective::Resync),
        (ErrorKind::ChangeStreamInvalidated, RetryDirective::Backoff),
        (ErrorKind::SourceConnection, RetryDirective::Backoff),
        (ErrorKind::DestinationConnection, RetryDirective::Backoff),
    ];
    for (kind, want) in cases {
        assert_eq!(policy(&SyncError::new(kind, "x")), want, "{kind}");
    }
    for (kind, reason) in [
        (ErrorKind::WorkerPanicked, "worker_panicked"),
        (ErrorKind::DocumentRejected, "document_rejected"),
        // One worker's broken invariant (checkpoint moving backwards) parks that worker only.
        (ErrorKind::InvariantViolated, "invariant_violated"),
        (ErrorKind::CollationMismatch, "collation_mismatch"),
        (ErrorKind::MassDeleteGuard, "mass_delete_guard"),
        // Unclassified defaults to park, not retry.
        (ErrorKind::SourceRead, "unclassified"),
        (ErrorKind::DestinationWrite, "unclassified"),
        (ErrorKind::Checkpoint, "unclassified"),
    ] {
        match policy(&SyncError::new(kind, "x")) {
            RetryDirective::Park {
                reason: r,
                solution,
            } => {
                assert_eq!(r, reason, "{kind}");
                assert!(!solution.is_empty());
            }
            other => panic!("{kind}: expected park, got {other:?}"),
        }
    }
    // A non-driver cause is unclassified too.
    let io = SyncError::with_source(
        ErrorKind::Checkpoint,
        "writing checkpoint",
        io::Error::other("disk"),
    );
    assert!(matches!(
        policy(&io),
        RetryDirective::Park {
            reason: "unclassified",
            ..
        }
    ));
    // A driver error wrapped in another error is still found.
    let wrapped = SyncError::with_source(
        ErrorKind::SourceRead,
        "reading",
        SyncError::with_source(
            ErrorKind::SourceRead,
            "inner",
            command_error(189, "PrimarySteppedDown", ""),
        ),
    );
    assert_eq!(policy(&wrapped), RetryDirective::Backoff);
    // 13 Unauthorized on one namespace's command parks it; a refused handshake is fatal (77).
    for kind in [
        ErrorKind::SourceRead,
        ErrorKind::DestinationWrite,
        ErrorKind::Checkpoint,
    ] {
        let denied = SyncError::with_source(
            kind,
            "applying batch",
            command_error(13, "Unauthorized", "not authorized on shop"),
        );
        assert!(
            matches!(
                policy(&denied),
                RetryDirective::Park {
                    reason: "unauthorized",
                    ..
                }
            ),
            "{kind}"
        );
    }
    // As built by the apply path (SyncError::mongo classifies 13 as authentication).
    let denied = SyncError::mongo(
        ErrorKind::DestinationWrite,
        "applying batch",
        command_error(13, "Unauthorized", "not authorized on shop"),
    );
    assert!(matches!(
        policy(&denied),
        RetryDirective::Park {
            reason: "unauthorized",
            ..
        }
    ));
    let refused = SyncError::with_source(
        ErrorKind::DestinationWrite,
        "applying batch",
        command_error(18, "AuthenticationFailed", "bad credentials"),
    );
    assert_eq!(policy(&refused), RetryDirective::Fatal { exit_code: 77 });
}

#[test]
fn sync_error_display_redacts_uris() {
    let e = SyncError::with_source(
        ErrorKind::SourceConnection,
        "connecting",
        io::Error::other("cannot reach mongodb://u:PW@h1"),
    );
    assert!(!e.to_string().contains("PW@"), "{e}");
    assert!(!format!("{e:?}").contains("PW@"), "{e:?}");
}

// ----- Backoff -----

#[test]
fn backoff_delays_stay_under_an_exponential_capped_ceiling() {
    let base = Duration::from_millis(100);
    let cap = Duration::from_secs(5);
    let mut b = Backoff::with_seed(base, cap, 7);
    let mut expected_ceiling = base;
    for attempt in 0..40 {
        assert_eq!(b.attempt(), attempt);
        assert_eq!(b.ceiling(), expected_ceiling.min(cap), "attempt {attempt}");
        let d = b.next_delay();
        assert!(d <= expected_ceiling.min(cap), "attempt {attempt}: {d:?}");
        expected_ceiling = expected_ceiling.saturating_mul(2);
    }
    assert_eq!(b.ceiling(), cap);
    b.reset();
    assert_eq!(b.attempt(), 0);
    assert_eq!(b.ceiling(), base);
}

#[test]
fn backoff_uses_the_full_jitter_range() {
    let cap = Duration::from_secs(1);
    let mut b = Backoff::with_seed(Duration::from_secs(1), cap, 42);
    let delays: Vec<Duration> = (0..200)
        .map(|_| {
            let d = b.next_delay();
            b.reset();
            d
        })
        .collect();
    let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
    assert!(*min < Duration::from_millis(100), "min {min:?}");
    assert!(*max > Duration::from_millis(900), "max {max:?}");
    assert!(delays.iter().all(|d| *d <= cap));
}

#[test]
fn backoff_from_config_caps_at_max_backoff_seconds() {
    let cfg = crate::config::SupervisorConfig {
        max_restarts: 3,
        max_backoff_seconds: 2,
    };
    let mut b = Backoff::from_config(&cfg);
    for _ in 0..20 {
        assert!(b.next_delay() <= Duration::from_secs(2));
    }
    assert_eq!(b.ceiling(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn backoff_sleep_completes_after_its_delay() {
    let mut b = Backoff::with_seed(Duration::from_secs(10), Duration::from_secs(10), 1);
    let mut probe = Backoff::with_seed(Duration::from_secs(10), Duration::from_secs(10), 1);
    let expected = probe.next_delay();
    let cancel = CancellationToken::new();
    let start = Instant::now();
    assert!(b.sleep(&cancel).await);
    assert_eq!(start.elapsed(), expected);
    assert_eq!(b.attempt(), 1);
}

#[tokio::test(start_paused = true)]
async fn backoff_sleep_returns_false_when_cancelled() {
    let hour = Duration::from_secs(3600);
    let mut b = Backoff::with_seed(hour, hour, 3);
    // Same seed, same first delay: check it is far longer than the cancellation point.
    let planned = Backoff::with_seed(hour, hour, 3).next_delay();
    assert!(planned > Duration::from_secs(1), "{planned:?}");
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        trigger.cancel();
    });
    let start = Instant::now();
    assert!(!b.sleep(&cancel).await);
    assert_eq!(start.elapsed(), Duration::from_millis(5));
    canceller.await.unwrap();
    // Already cancelled: returns false at once, without sleeping.
    let start = Instant::now();
    assert!(!b.sleep(&cancel).await);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[test]
fn transient_codes_inside_write_errors_are_transient_statement_errors() {
    for c in [11602, 189, 91, 10107, 112, 11600, 262, 50] {
        assert!(is_transient_write_error(c), "{c}");
    }
    for c in [11000, 121, 2, 40, 66, 13, 0] {
        assert!(!is_transient_write_error(c), "{c}");
    }
}

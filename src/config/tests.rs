//! Loading and validation tests. Environment variables are passed explicitly
//! (`load_from_str_with_env`), so no test touches the process environment.

use std::{io::Write, path::Path, time::Duration};

use super::*;

const SRC: &str =
    "mongodb://syncer:s3cr3t-src@src1.example.net:27017,src2.example.net:27017/?replicaSet=rs0";
const DST: &str = "mongodb://writer:s3cr3t-dst@dst1.example.net:27017/?replicaSet=rs1";

fn minimal() -> String {
    format!("[source]\nuri = \"{SRC}\"\n[destination]\nuri = \"{DST}\"\n")
}

fn with(extra: &str) -> String {
    format!("{}\n{extra}", minimal())
}

fn load_ok(text: &str) -> Config {
    match load_from_str(text) {
        Ok(config) => config,
        Err(err) => panic!("expected a valid config, got: {err}"),
    }
}

fn load_err(text: &str) -> ConfigError {
    match load_from_str(text) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(err) => err,
    }
}

/// Asserts that `err` concerns `field` and that its message contains `needle`.
fn assert_field(err: &ConfigError, field: &str, needle: &str) {
    assert!(
        err.fields().contains(&field),
        "expected an error for {field}, got: {err}"
    );
    let text = err.to_string();
    assert!(text.contains(needle), "expected {needle:?} in: {text}");
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn defaults_are_the_documented_constants() {
    let c = load_ok(&minimal());
    assert_eq!(c.sync.id, DEFAULT_SYNC_ID);
    assert_eq!(
        c.sync
            .namespaces
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
        DEFAULT_NAMESPACES
    );
    assert!(c.sync.exclude.is_empty());
    assert!(c.sync.rename.is_empty());
    assert_eq!(c.sync.on_history_lost, OnHistoryLost::Resync);
    assert_eq!(c.sync.initial_copy, InitialCopy::Auto);
    assert_eq!(c.sync.start_at_operation_time, None);
    assert_eq!(c.apply.batch_max_events, 1000);
    assert_eq!(c.apply.batch_max_bytes, 8_388_608);
    assert_eq!(c.apply.batch_max_wait(), Duration::from_millis(20));
    assert_eq!(c.apply.update_mode, UpdateMode::Delta);
    assert_eq!(c.apply.write_lanes, WriteLanes::Auto);
    assert_eq!(c.checkpoint.database, "mongo_syncd");
    assert_eq!(c.checkpoint.interval_seconds, 1);
    assert_eq!(c.conflict.policy, ConflictPolicy::SourceWins);
    assert_eq!(c.conflict.field, "");
    assert!(c.conflict.journal);
    assert!(!c.conflict.enable_pre_images);
    assert!(c.conflict.rules.is_empty());
    assert_eq!(c.validation.interval_seconds, 600);
    assert_eq!(c.validation.mode, ValidationMode::Hash);
    assert!(!c.validation.repair);
    assert_eq!(c.validation.max_docs_per_second, 0);
    assert!(!c.validation.strict_order);
    assert_eq!(c.supervisor.max_restarts, 10);
    assert_eq!(c.supervisor.max_backoff_seconds, 60);
    assert_eq!(c.http.listen.to_string(), DEFAULT_HTTP_LISTEN);
    assert!(c.http.token().is_none());
    assert_eq!(c.health.max_lag_seconds, 30);
    assert_eq!(c.metrics.max_namespaces, 500);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.shutdown.timeout_seconds, 30);
    assert_eq!(c.runtime.worker_threads, 0);
    assert_eq!(c.source.uri().unwrap().expose(), SRC);
    assert!(!c.source.tls_allow_invalid_certificates);
    // Default impls agree with what an empty section deserialises to.
    assert_eq!(c.apply, ApplyConfig::default());
    assert_eq!(c.http, HttpConfig::default());
}

#[test]
fn from_uris_builds_a_valid_default_config() {
    let c = Config::from_uris("mongodb://127.0.0.1:1", "mongodb://127.0.0.1:2").unwrap();
    assert_eq!(
        c,
        load_from_str(
            "[source]\nuri=\"mongodb://127.0.0.1:1\"\n[destination]\nuri=\"mongodb://127.0.0.1:2\""
        )
        .unwrap()
    );
    let err = Config::from_uris("mongodb://127.0.0.1:1", "mongodb://127.0.0.1:1").unwrap_err();
    assert_field(&err, "destination.uri", "same host");
}

#[test]
fn env_overrides_the_file() {
    let text = with("[apply]\nbatch_max_events = 50\n");
    let c = load_from_str_with_env(
        &text,
        env(&[
            (
                "MONGO_SYNCD_SOURCE__URI",
                "mongodb://u:p@other.example.net:27017/?replicaSet=rs9",
            ),
            ("MONGO_SYNCD_APPLY__BATCH_MAX_EVENTS", "5"),
            ("MONGO_SYNCD_LOG__FORMAT", "json"),
            (
                "MONGO_SYNCD_SYNC__NAMESPACES",
                "[\"shop.*\", \"crm.contacts\"]",
            ),
            ("MONGO_SYNCD_HTTP__TOKEN", "12345"),
            ("MONGO_SYNCD_SYNC__ID", "42"),
            ("UNRELATED", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.source.uri().unwrap().expose(),
        "mongodb://u:p@other.example.net:27017/?replicaSet=rs9"
    );
    assert_eq!(c.apply.batch_max_events, 5);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.sync.namespaces.len(), 2);
    // Numeric-looking strings stay the strings the operator meant.
    assert_eq!(c.http.token().unwrap().expose(), "12345");
    assert_eq!(c.sync.id, "42");
}

#[test]
fn env_alone_can_provide_the_uris() {
    let c = load_from_str_with_env(
        "",
        env(&[
            ("MONGO_SYNCD_SOURCE__URI", SRC),
            ("MONGO_SYNCD_DESTINATION__URI", DST),
        ]),
    )
    .unwrap();
    assert_eq!(c.destination.uri().unwrap().expose(), DST);
}

#[test]
fn unknown_key_in_file_is_named() {
    let err = load_err(&minimal().replace("[source]\n", "[source]\nurii = 1\n"));
    assert_field(&err, "source.urii", "unknown key");
    assert!(err.to_string().contains("in config text"), "{err}");

    let err = load_err(&with("[apply]\nbatch_max_event = 5\n"));
    assert_field(&err, "apply.batch_max_event", "unknown key");

    let err = load_err(&with("[sourcee]\nuri = \"x\"\n"));
    assert_field(&err, "sourcee", "unknown key");

    let err = load_err(&with(
        "[[conflict.rules]]\nnamespaces = [\"a.*\"]\npolicy = \"journal\"\nfieldd = \"x\"\n",
    ));
    assert_field(&err, "conflict.rules[0].fieldd", "unknown key");
}

#[test]
fn unknown_key_in_env_names_the_variable() {
    let err =
        load_from_str_with_env(&minimal(), env(&[("MONGO_SYNCD_SOURCE__URII", "x")])).unwrap_err();
    assert_field(
        &err,
        "source.urii",
        "from environment variable MONGO_SYNCD_SOURCE__URII",
    );

    // A single underscore does not nest: the key is `source_uri`, which does not exist.
    let err =
        load_from_str_with_env(&minimal(), env(&[("MONGO_SYNCD_SOURCE_URI", "x")])).unwrap_err();
    assert_field(&err, "source_uri", "MONGO_SYNCD_SOURCE_URI");

    let err =
        load_from_str_with_env(&minimal(), env(&[("MONGO_SYNCD_SOURCE____URI", "x")])).unwrap_err();
    assert_field(&err, "MONGO_SYNCD_SOURCE____URI", "does not name a key");
}

#[test]
fn bad_env_value_names_the_variable() {
    let err = load_from_str_with_env(
        &minimal(),
        env(&[("MONGO_SYNCD_APPLY__BATCH_MAX_EVENTS", "lots")]),
    )
    .unwrap_err();
    assert_field(
        &err,
        "apply.batch_max_events",
        "from environment variable MONGO_SYNCD_APPLY__BATCH_MAX_EVENTS",
    );
}

#[test]
fn missing_uri_is_required() {
    let err = load_err("");
    assert_field(&err, "source.uri", "required");
    assert_field(&err, "destination.uri", "required");
    let err = load_err(&format!("[source]\nuri = \"{SRC}\"\n"));
    assert_eq!(err.fields(), ["destination.uri"]);
}

#[test]
fn malformed_uris_are_rejected() {
    for bad in [
        "http://h1:27017",
        "mongodb://",
        "mongodb://h1:99999",
        "mongodb://h1/?maxPoolSize=abc",
        "mongodb://u:p:q@h1/",
        "mongodb://h1,,h2/",
        "mongodb+srv://h1:27017/",
        "",
    ] {
        let err = load_err(&format!(
            "[source]\nuri = \"{bad}\"\n[destination]\nuri = \"{DST}\"\n"
        ));
        assert_field(&err, "source.uri", "");
    }
}

#[test]
fn errors_never_echo_secrets() {
    // A connection string where a table belongs.
    let err = load_err("source = \"mongodb://u:PW-LEAK-1@h1\"\n");
    assert!(!err.to_string().contains("PW-LEAK-1"), "{err}");
    assert_field(&err, "source", "expected a table");
    // A syntax error on the line holding the password.
    let err = load_err("[source]\nuri = \"mongodb://u:PW-LEAK-2@h1\n");
    assert!(!err.to_string().contains("PW-LEAK-2"), "{err}");
    assert!(
        matches!(err, ConfigError::Syntax { line: 2, .. }),
        "{err:?}"
    );
    // A URI the driver rejects.
    let err = load_err(&format!(
        "[source]\nuri = \"mongodb://u:PW-LEAK-3@h1:0/?replicaSet=rs0\"\n[destination]\nuri = \"{DST}\"\n"
    ));
    assert!(!err.to_string().contains("PW-LEAK-3"), "{err}");
    // Debug of a loaded config.
    let c = load_ok(&minimal());
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
}

fn secret_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

#[test]
fn uri_file_is_read_and_trimmed() {
    let file = secret_file(&format!("  {SRC}\n\n"));
    let text = format!(
        "[source]\nuri_file = \"{}\"\n[destination]\nuri = \"{DST}\"\n",
        file.path().display()
    );
    let c = load_ok(&text);
    assert_eq!(c.source.uri().unwrap().expose(), SRC);
    assert_eq!(c.source.uri_file.as_deref(), Some(file.path()));
}

#[test]
fn uri_file_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("source.uri"), SRC).unwrap();
    std::fs::write(
        dir.path().join("syncd.toml"),
        format!("[source]\nuri_file = \"source.uri\"\n[destination]\nuri = \"{DST}\"\n"),
    )
    .unwrap();
    let c = load_with_env(&dir.path().join("syncd.toml"), env(&[])).unwrap();
    assert_eq!(c.source.uri().unwrap().expose(), SRC);
}

#[test]
fn uri_file_unreadable_names_key_and_path() {
    let text = format!(
        "[source]\nuri_file = \"/nonexistent/mongo-syncd/source.uri\"\n[destination]\nuri = \"{DST}\"\n"
    );
    let err = load_err(&text);
    assert!(matches!(err, ConfigError::SecretFile { .. }), "{err:?}");
    assert_field(
        &err,
        "source.uri_file",
        "/nonexistent/mongo-syncd/source.uri",
    );

    let empty = secret_file("\n  \n");
    let err = load_err(&format!(
        "[source]\nuri = \"{SRC}\"\n[destination]\nuri_file = \"{}\"\n",
        empty.path().display()
    ));
    assert_field(&err, "destination.uri_file", "is empty");
}

#[test]
fn bad_uri_in_uri_file_names_the_file_key_not_the_contents() {
    let file = secret_file("mongodb://u:PW-IN-FILE@h1:0/");
    let err = load_err(&format!(
        "[source]\nuri_file = \"{}\"\n[destination]\nuri = \"{DST}\"\n",
        file.path().display()
    ));
    assert_field(&err, "source.uri_file", "not a valid connection string");
    assert!(!err.to_string().contains("PW-IN-FILE"), "{err}");
}

#[test]
fn uri_and_uri_file_are_exclusive() {
    let file = secret_file(SRC);
    let text = format!(
        "[source]\nuri = \"{SRC}\"\nuri_file = \"{}\"\n[destination]\nuri = \"{DST}\"\n",
        file.path().display()
    );
    let err = load_err(&text);
    assert_field(&err, "source.uri_file", "either uri or uri_file");
}

#[test]
fn token_file_is_read_and_exclusive_with_token() {
    let file = secret_file("tok-123\n");
    let c = load_ok(&with(&format!(
        "[http]\ntoken_file = \"{}\"\n",
        file.path().display()
    )));
    assert_eq!(c.http.token().unwrap().expose(), "tok-123");
    let err = load_err(&with(&format!(
        "[http]\ntoken = \"a\"\ntoken_file = \"{}\"\n",
        file.path().display()
    )));
    assert_field(&err, "http.token_file", "not both");
    let err = load_err(&with("[http]\ntoken_file = \"/nonexistent/token\"\n"));
    assert_field(&err, "http.token_file", "/nonexistent/token");
    let err = load_err(&with("[http]\ntoken = \"  \"\n"));
    assert_field(&err, "http.token", "must not be empty");
}

#[test]
fn weak_write_concerns_are_rejected() {
    for option in ["w=0", "w=1", "w=2", "journal=false", "w=myTag"] {
        let err = load_err(&format!(
            "[source]\nuri = \"{SRC}\"\n[destination]\nuri = \"{DST}&{option}\"\n"
        ));
        assert_field(&err, "destination.uri", "majority");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
    let err = load_err(&format!(
        "[source]\nuri = \"{SRC}&w=1\"\n[destination]\nuri = \"{DST}\"\n"
    ));
    assert_field(&err, "source.uri", "w=1");
    load_ok(&format!(
        "[source]\nuri = \"{SRC}\"\n[destination]\nuri = \"{DST}&w=majority&journal=true\"\n"
    ));
}

#[test]
fn same_hosts_are_rejected() {
    for dst in [
        "mongodb://src1.example.net:27017/?replicaSet=rs0",
        "mongodb://SRC2.example.net/", // case-insensitive, default port
        "mongodb://other.example.net,src1.example.net:27017/",
    ] {
        let err = load_err(&format!(
            "[source]\nuri = \"{SRC}\"\n[destination]\nuri = \"{dst}\"\n"
        ));
        assert_field(&err, "destination.uri", "same host");
    }
    let err = load_err(
        "[source]\nuri = \"mongodb+srv://a:b@cluster0.example.net\"\n[destination]\nuri = \"mongodb+srv://c:d@Cluster0.example.net/\"\n",
    );
    assert_field(&err, "destination.uri", "same host");
    // Same host, different port: a different deployment (two simulators on one machine).
    load_ok("[source]\nuri = \"mongodb://127.0.0.1:27017\"\n[destination]\nuri = \"mongodb://127.0.0.1:27018\"\n");
}

#[test]
fn rename_collisions_are_rejected() {
    let err = load_err(&with("[sync.rename]\na = \"x\"\nb = \"x\"\n"));
    assert_field(&err, "sync.rename.\"b\"", "also the target of \"a\"");

    let err = load_err(&with(
        "[sync.rename]\n\"a.c1\" = \"x.y\"\n\"b.c2\" = \"x.y\"\n",
    ));
    assert_field(&err, "sync.rename.\"b.c2\"", "also the target of \"a.c1\"");

    for target in ["admin", "local", "config", "mongo_syncd"] {
        let err = load_err(&with(&format!("[sync.rename]\nshop = \"{target}\"\n")));
        assert_field(&err, "sync.rename.\"shop\"", "metadata database");
    }
    let err = load_err(&with(
        "[checkpoint]\ndatabase = \"meta\"\n[sync.rename]\n\"shop.orders\" = \"meta.orders\"\n",
    ));
    assert_field(&err, "sync.rename.\"shop.orders\"", "metadata database");

    let err = load_err(&with("[sync.rename]\nadmin = \"x\"\n"));
    assert_field(&err, "sync.rename.\"admin\"", "never synced");

    let err = load_err(&with(
        "[sync.rename]\n\"shop.orders\" = \"shop.system.x\"\n",
    ));
    assert_field(&err, "sync.rename.\"shop.orders\"", "system collection");

    // Shape errors are reported at load time with the key.
    let err = load_err(&with("[sync.rename]\nshop = \"a.b\"\n"));
    assert_field(&err, "sync.rename", "\"shop\"");

    // A swap is fine: each source maps once.
    let c = load_ok(&with("[sync.rename]\na = \"b\"\nb = \"a\"\n"));
    assert_eq!(c.rename_map().target("a", "x"), ("b".into(), "x".into()));
}

#[test]
fn conflict_rule_field_is_required_for_field_policies() {
    let rules = "[[conflict.rules]]\nnamespaces = [\"a.*\"]\npolicy = \"journal\"\n\
                 [[conflict.rules]]\nnamespaces = [\"b.*\"]\npolicy = \"newest-wins\"\n";
    let err = load_err(&with(rules));
    assert_eq!(err.fields(), ["conflict.rules[1].field"]);
    assert_field(
        &err,
        "conflict.rules[1].field",
        "required for policy \"newest-wins\"",
    );
    // A global field satisfies the rule.
    load_ok(&with(&format!(
        "[conflict]\nfield = \"updatedAt\"\n{rules}"
    )));

    let err = load_err(&with("[conflict]\npolicy = \"version-wins\"\n"));
    assert_field(
        &err,
        "conflict.field",
        "required for policy \"version-wins\"",
    );

    let err = load_err(&with(
        "[[conflict.rules]]\nnamespaces = [\"a.*\"]\npolicy = \"version-wins\"\nfield = \"$v\"\n",
    ));
    assert_field(&err, "conflict.rules[0].field", "no leading '$'");

    let err = load_err(&with(
        "[[conflict.rules]]\nnamespaces = []\npolicy = \"journal\"\n",
    ));
    assert_field(&err, "conflict.rules[0].namespaces", "at least one");

    let err = load_err(&with("[[conflict.rules]]\nnamespaces = [\"a.*\"]\n"));
    assert_field(&err, "conflict.rules[0].policy", "required");

    let err = load_err(&with("[conflict]\npolicy = \"last-wins\"\n"));
    assert_field(&err, "conflict.policy", "\"newest-wins\"");
}

#[test]
fn conflict_resolution_first_matching_rule_wins() {
    let c = load_ok(&with(
        "[conflict]\npolicy = \"destination-wins\"\nfield = \"ts\"\n\
         [[conflict.rules]]\nnamespaces = [\"shop.orders\"]\npolicy = \"version-wins\"\nfield = \"v\"\n\
         [[conflict.rules]]\nnamespaces = [\"shop.*\", \"crm.*\"]\npolicy = \"newest-wins\"\n\
         [[conflict.rules]]\nnamespaces = [\"shop.items\"]\npolicy = \"journal\"\n\
         [[conflict.rules]]\nnamespaces = [\"*.*\"]\npolicy = \"source-wins\"\nfield = \"ignored\"\n",
    ));
    let table = [
        ("shop", "orders", ConflictPolicy::VersionWins, Some("v")),
        // rule 1 matches before rule 2 (journal) could
        ("shop", "items", ConflictPolicy::NewestWins, Some("ts")),
        ("crm", "leads", ConflictPolicy::NewestWins, Some("ts")),
        // source-wins carries no field even when the rule names one
        ("billing", "invoices", ConflictPolicy::SourceWins, None),
    ];
    for (db, coll, policy, field) in table {
        assert_eq!(
            c.conflict_for(db, coll),
            (policy, field.map(str::to_owned)),
            "{db}.{coll}"
        );
    }
    let no_rules = load_ok(&with("[conflict]\npolicy = \"journal\"\n"));
    assert_eq!(
        no_rules.conflict_for("a", "b"),
        (ConflictPolicy::Journal, None)
    );
}

#[test]
fn namespace_patterns_are_checked_with_their_index() {
    let err = load_err(&with("[sync]\nnamespaces = [\"shop.*\", \"shop\"]\n"));
    assert_field(
        &err,
        "sync.namespaces[1]",
        "invalid namespace pattern \"shop\"",
    );
    let err = load_err(&with("[sync]\nexclude = [\"a.b*\"]\n"));
    assert_field(
        &err,
        "sync.exclude[0]",
        "'*' must be the whole collection name",
    );
    let err = load_err(&with("[sync]\nnamespaces = [\"admin.*\"]\n"));
    assert_field(&err, "sync.namespaces[0]", "never synced");
    let err = load_err(&with("[sync]\nnamespaces = [\"shop.system.views\"]\n"));
    assert_field(&err, "sync.namespaces[0]", "never synced");
    let err = load_err(&with("[sync]\nnamespaces = []\n"));
    assert_field(&err, "sync.namespaces", "at least one");

    let c = load_ok(&with(
        "[sync]\nnamespaces = [\"shop.*\", \"logs.a.b\"]\nexclude = [\"shop.tmp\"]\n",
    ));
    let filter = c.namespace_filter();
    assert!(filter.matches("shop", "orders"));
    assert!(!filter.matches("shop", "tmp"));
    assert!(filter.matches("logs", "a.b"));
    assert!(!filter.matches("mongo_syncd", "checkpoints"));
}

#[test]
fn start_at_operation_time_forms() {
    let c = load_ok(&with(
        "[sync]\ninitial_copy = \"skip\"\nstart_at_operation_time = { t = 1700000000, i = 7 }\n",
    ));
    let t = c.sync.start_at_operation_time.unwrap();
    assert_eq!((t.t, t.i), (1_700_000_000, 7));
    assert_eq!(t.to_timestamp().increment, 7);
    let c = load_ok(&with(
        "[sync]\ninitial_copy = \"skip\"\nstart_at_operation_time = 1700000000\n",
    ));
    assert_eq!(
        c.sync.start_at_operation_time,
        Some(OperationTime {
            t: 1_700_000_000,
            i: 0
        })
    );
    let err = load_err(&with("[sync]\nstart_at_operation_time = 1700000000\n"));
    assert_field(
        &err,
        "sync.start_at_operation_time",
        "initial_copy = \"skip\"",
    );
    let err = load_err(&with(
        "[sync]\ninitial_copy = \"skip\"\nstart_at_operation_time = { t = 1, x = 2 }\n",
    ));
    assert_field(&err, "sync.start_at_operation_time.x", "unknown key");
    let err = load_err(&with(
        "[sync]\ninitial_copy = \"skip\"\nstart_at_operation_time = -5\n",
    ));
    assert_field(&err, "sync.start_at_operation_time", "out of range");
}

#[test]
fn numeric_bounds() {
    let cases = [
        ("[apply]\nbatch_max_events = 0", "apply.batch_max_events"),
        (
            "[apply]\nbatch_max_events = 100001",
            "apply.batch_max_events",
        ),
        ("[apply]\nbatch_max_bytes = 1000", "apply.batch_max_bytes"),
        (
            "[apply]\nbatch_max_bytes = 50331648",
            "apply.batch_max_bytes",
        ),
        (
            "[apply]\nbatch_max_wait_ms = 60001",
            "apply.batch_max_wait_ms",
        ),
        ("[apply]\nwrite_lanes = 0", "apply.write_lanes"),
        ("[apply]\nwrite_lanes = 17", "apply.write_lanes"),
        (
            "[apply]\nmax_buffered_bytes = 4194304",
            "apply.max_buffered_bytes",
        ),
        (
            "[apply]\nmax_buffered_bytes = 68719476737",
            "apply.max_buffered_bytes",
        ),
        ("[apply]\nbatch_max_events = -1", "apply.batch_max_events"),
        (
            "[checkpoint]\ninterval_seconds = 0",
            "checkpoint.interval_seconds",
        ),
        (
            "[supervisor]\nmax_backoff_seconds = 0",
            "supervisor.max_backoff_seconds",
        ),
        ("[health]\nmax_lag_seconds = 0", "health.max_lag_seconds"),
        ("[metrics]\nmax_namespaces = 0", "metrics.max_namespaces"),
        (
            "[shutdown]\ntimeout_seconds = 0",
            "shutdown.timeout_seconds",
        ),
        ("[runtime]\nworker_threads = 1025", "runtime.worker_threads"),
        ("[source]\nmax_pool_size = 0", "source.max_pool_size"),
        ("[source]\nmin_pool_size = 200", "source.min_pool_size"),
        (
            "[destination]\nconnect_timeout_ms = 0",
            "destination.connect_timeout_ms",
        ),
    ];
    for (extra, field) in cases {
        // Put the extra keys into the existing sections where they already exist.
        let text = if extra.starts_with("[source]") || extra.starts_with("[destination]") {
            let (section, key) = extra.split_once('\n').unwrap();
            minimal().replace(&format!("{section}\n"), &format!("{section}\n{key}\n"))
        } else {
            with(extra)
        };
        let err = load_err(&text);
        assert_field(&err, field, "");
    }
    load_ok(&with(
        "[apply]\nbatch_max_events = 100000\nbatch_max_bytes = 48000000\nbatch_max_wait_ms = 0\n",
    ));
    load_ok(&with("[apply]\nbatch_max_bytes = 1048576\n"));
}

#[test]
fn other_keys_are_validated() {
    let err = load_err(&with("[checkpoint]\ndatabase = \"admin\"\n"));
    assert_field(&err, "checkpoint.database", "system database");
    let err = load_err(&with("[checkpoint]\ndatabase = \"my.db\"\n"));
    assert_field(&err, "checkpoint.database", "forbidden character");
    let err = load_err(&with("[http]\nlisten = \"localhost\"\n"));
    assert_field(&err, "http.listen", "");
    let err = load_err(&with("[log]\nlevel = \"mongo_syncd=loud\"\n"));
    assert_field(&err, "log.level", "not a valid filter directive");
    let err = load_err(&with("[sync]\nid = \"has space\"\n"));
    assert_field(&err, "sync.id", "[A-Za-z0-9._-]");
    let err = load_err(&with("[validation]\nmode = \"count\"\nrepair = true\n"));
    assert_field(&err, "validation.repair", "mode = \"hash\"");
    let err = load_err(&with("[sync]\non_history_lost = \"retry\"\n"));
    assert_field(&err, "sync.on_history_lost", "\"resync\", \"park\"");
    // Every problem is reported at once.
    let err = load_err(&with(
        "[health]\nmax_lag_seconds = 0\n[shutdown]\ntimeout_seconds = 0\n",
    ));
    assert_eq!(
        err.fields(),
        ["health.max_lag_seconds", "shutdown.timeout_seconds"]
    );
}

#[test]
fn write_lanes_is_auto_or_a_count() {
    assert_eq!(
        load_ok(&with("[apply]\nwrite_lanes = \"auto\"\n"))
            .apply
            .write_lanes,
        WriteLanes::Auto
    );
    assert_eq!(
        load_ok(&with("[apply]\nwrite_lanes = 16\n"))
            .apply
            .write_lanes,
        WriteLanes::Fixed(16)
    );
    for env_value in ["auto", "3"] {
        let c = load_from_str_with_env(
            &with(""),
            env(&[("MONGO_SYNCD_APPLY__WRITE_LANES", env_value)]),
        )
        .unwrap();
        let expected = match env_value {
            "auto" => WriteLanes::Auto,
            _ => WriteLanes::Fixed(3),
        };
        assert_eq!(c.apply.write_lanes, expected);
    }
    for bad in ["\"fast\"", "-1", "0", "17", "2.5"] {
        let err = load_err(&with(&format!("[apply]\nwrite_lanes = {bad}\n")));
        assert_field(&err, "apply.write_lanes", "");
        if bad != "2.5" {
            assert_field(&err, "apply.write_lanes", "\"auto\" or between 1 and 16");
        }
    }
    // The effective config prints the key as it would be written.
    let printed = load_ok(&with("")).redacted().to_toml().unwrap();
    assert!(printed.contains("write_lanes = \"auto\""), "{printed}");
    let printed = load_ok(&with("[apply]\nwrite_lanes = 2\n"))
        .redacted()
        .to_toml()
        .unwrap();
    assert!(printed.contains("write_lanes = 2"), "{printed}");
}

#[test]
fn redacted_config_prints_as_toml_without_secrets() {
    let c = load_ok(&with(
        "[http]\ntoken = \"tok-SECRET\"\n[sync.rename]\nshop = \"shop_dr\"\n",
    ));
    let text = c.redacted().to_toml().unwrap();
    assert!(
        text.contains("uri = \"mongodb://syncer:***@src1.example.net:27017"),
        "{text}"
    );
    assert!(text.contains("token = \"***\""), "{text}");
    assert!(
        !text.contains("s3cr3t") && !text.contains("tok-SECRET"),
        "{text}"
    );
    // The output is itself valid TOML with every section.
    let table: toml::Table = text.parse().unwrap();
    for section in [
        "source",
        "destination",
        "sync",
        "apply",
        "checkpoint",
        "conflict",
        "validation",
        "supervisor",
        "http",
        "health",
        "metrics",
        "log",
        "shutdown",
        "runtime",
        "ha",
    ] {
        assert!(table.contains_key(section), "missing [{section}] in {text}");
    }
}

#[tokio::test]
async fn client_options_apply_keys_over_the_uri() {
    let c = load_ok(&format!(
        "[source]\nuri = \"{SRC}&appName=fromuri&maxPoolSize=7&connectTimeoutMS=1234\"\n\
         max_pool_size = 250\nserver_selection_timeout_ms = 5000\nsocket_timeout_ms = 9000\n\
         tls_ca_file = \"/etc/ssl/ca.pem\"\n\
         [destination]\nuri = \"{DST}\"\napp_name = \"dr-writer\"\n"
    ));
    let src = c.source_client_options().await.unwrap();
    assert_eq!(src.app_name.as_deref(), Some("fromuri"));
    assert_eq!(src.max_pool_size, Some(250));
    assert_eq!(src.min_pool_size, Some(DEFAULT_MIN_POOL_SIZE));
    assert_eq!(src.connect_timeout, Some(Duration::from_millis(1234)));
    assert_eq!(src.server_selection_timeout, Some(Duration::from_secs(5)));
    assert_eq!(src.repl_set_name.as_deref(), Some("rs0"));
    assert_eq!(c.source.socket_timeout(), Some(Duration::from_secs(9)));
    match &src.tls {
        Some(Tls::Enabled(tls)) => {
            assert_eq!(
                tls.ca_file_path.as_deref(),
                Some(Path::new("/etc/ssl/ca.pem"))
            );
        }
        other => panic!("expected TLS, got {other:?}"),
    }
    let wc = src.write_concern.unwrap();
    assert_eq!(wc.w, Some(Acknowledgment::Majority));
    assert_eq!(wc.journal, Some(true));

    let dst = c.destination_client_options().await.unwrap();
    assert_eq!(dst.app_name.as_deref(), Some("dr-writer"));
    assert_eq!(dst.max_pool_size, Some(DEFAULT_MAX_POOL_SIZE));
    assert_eq!(
        dst.server_selection_timeout,
        Some(Duration::from_millis(DEFAULT_SERVER_SELECTION_TIMEOUT_MS))
    );
    assert!(dst.tls.is_none());
    assert!(dst.credential.is_some());
}

#[test]
fn tls_keys_conflict_with_tls_false_in_the_uri() {
    let err = load_err(&format!(
        "[source]\nuri = \"{SRC}&tls=false\"\ntls_ca_file = \"/ca.pem\"\n[destination]\nuri = \"{DST}\"\n"
    ));
    assert_field(&err, "source.uri", "tls=false");
}

/// The shipped configs: `config/*.toml` with URIs supplied the way each is meant to get them.
mod shipped {
    use super::*;

    fn read(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn uris_env() -> Vec<(String, String)> {
        env(&[
            ("MONGO_SYNCD_SOURCE__URI", SRC),
            ("MONGO_SYNCD_DESTINATION__URI", DST),
        ])
    }

    #[test]
    fn annotated_config_loads_with_uris_from_the_environment() {
        let c = load_from_str_with_env(&read("mongo-syncd.toml"), uris_env()).unwrap();
        assert_eq!(c.source.uri().unwrap().expose(), SRC);
    }

    /// Uncommenting every `# key = value` line of the annotated file must give exactly the
    /// defaults: the file documents the real `DEFAULT_*` values.
    #[test]
    fn annotated_config_documents_the_real_defaults() {
        let text = read("mongo-syncd.toml");
        let mut uncommented = String::new();
        let mut count = 0;
        for line in text.lines() {
            let candidate = line.strip_prefix("# ").unwrap_or("");
            let is_default = candidate.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            if is_default {
                uncommented.push_str(candidate);
                count += 1;
            } else {
                uncommented.push_str(line);
            }
            uncommented.push('\n');
        }
        assert!(count >= 40, "only {count} documented defaults found");
        let documented = load_from_str_with_env(&uncommented, uris_env())
            .unwrap_or_else(|e| panic!("uncommented defaults do not load: {e}"));
        let defaults = load_from_str_with_env("", uris_env()).unwrap();
        // Endpoint keys without a fixed default are documented with their effective values;
        // compare what the driver ends up with.
        assert_eq!(documented.sync, defaults.sync);
        assert_eq!(documented.apply, defaults.apply);
        assert_eq!(documented.checkpoint, defaults.checkpoint);
        assert_eq!(documented.conflict, defaults.conflict);
        assert_eq!(documented.validation, defaults.validation);
        assert_eq!(documented.supervisor, defaults.supervisor);
        assert_eq!(documented.http, defaults.http);
        assert_eq!(documented.health, defaults.health);
        assert_eq!(documented.metrics, defaults.metrics);
        assert_eq!(documented.log, defaults.log);
        assert_eq!(documented.shutdown, defaults.shutdown);
        assert_eq!(documented.runtime, defaults.runtime);
        assert_eq!(documented.ha, defaults.ha);
        for (doc, def) in [
            (&documented.source, &defaults.source),
            (&documented.destination, &defaults.destination),
        ] {
            assert_eq!(doc.app_name.as_deref(), Some(DEFAULT_APP_NAME));
            assert_eq!(doc.max_pool_size, Some(DEFAULT_MAX_POOL_SIZE));
            assert_eq!(doc.min_pool_size, Some(DEFAULT_MIN_POOL_SIZE));
            assert_eq!(doc.connect_timeout_ms, Some(DEFAULT_CONNECT_TIMEOUT_MS));
            assert_eq!(
                doc.server_selection_timeout_ms,
                Some(DEFAULT_SERVER_SELECTION_TIMEOUT_MS)
            );
            assert_eq!(
                doc.tls_allow_invalid_certificates,
                def.tls_allow_invalid_certificates
            );
            assert_eq!(doc.socket_timeout_ms, def.socket_timeout_ms);
        }
    }

    #[test]
    fn dev_config_is_valid() {
        let c = load_from_str(&read("dev.toml")).unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn staging_config_is_valid_with_uris_from_the_environment() {
        let c = load_from_str_with_env(&read("staging.toml"), uris_env()).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn prod_config_is_valid_with_systemd_credentials() {
        // Stand in for /run/credentials/mongo-syncd.service/ (systemd LoadCredential=).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("source-uri"), format!("{SRC}\n")).unwrap();
        std::fs::write(dir.path().join("destination-uri"), format!("{DST}\n")).unwrap();
        std::fs::write(dir.path().join("http-token"), "prod-token\n").unwrap();
        let text = read("prod.toml");
        assert!(text.contains("/run/credentials/mongo-syncd.service/"));
        let text = text.replace(
            "/run/credentials/mongo-syncd.service/",
            &format!("{}/", dir.path().display()),
        );
        let c = load_from_str(&text).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.source.uri().unwrap().expose(), SRC);
        assert_eq!(c.destination.uri().unwrap().expose(), DST);
        assert_eq!(c.http.token().unwrap().expose(), "prod-token");
    }
}

// ---- issue 12 ----

#[test]
fn reserved_characters_in_a_password_never_echo_any_part_of_it() {
    // Raw (not percent-encoded) reserved characters: the URI parser splits the password at
    // them, and whatever it quotes must not contain either half.
    for sep in [
        "?", "#", "/", "[", "]", "%", "%zz", "&", "=", ",", ";", ":", " ",
    ] {
        let uri = format!("mongodb://user:LEAKa{sep}LEAKb@h1:27017/?replicaSet=rs0");
        let text = format!("[source]\nuri = \"{uri}\"\n[destination]\nuri = \"{DST}\"\n");
        match load_from_str(&text) {
            Ok(c) => {
                // Accepted: the password is a secret; nothing to echo.
                assert!(!format!("{c:?}").contains("LEAK"), "separator {sep:?}");
            }
            Err(err) => {
                let shown = err.to_string();
                assert!(
                    !shown.contains("LEAKa") && !shown.contains("LEAKb"),
                    "separator {sep:?}: {shown}"
                );
                assert_field(&err, "source.uri", "");
            }
        }
    }
}

#[test]
fn secret_files_are_capped() {
    let err = load_err(&format!(
        "[source]\nuri_file = \"/dev/zero\"\n[destination]\nuri = \"{DST}\"\n"
    ));
    assert_field(&err, "source.uri_file", "larger than 65536 bytes");

    let big = secret_file(&"x".repeat(super::load::MAX_SECRET_FILE_BYTES + 1));
    let err = load_err(&with(&format!(
        "[http]\ntoken_file = \"{}\"\n",
        big.path().display()
    )));
    assert_field(&err, "http.token_file", "larger than 65536 bytes");
    assert!(!err.to_string().contains("xxxx"), "{err}");
}

#[cfg(unix)]
#[test]
fn credential_files_readable_by_others_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let file = secret_file(SRC);
    let text = format!(
        "[source]\nuri_file = \"{}\"\n[destination]\nuri = \"{DST}\"\n",
        file.path().display()
    );
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(load_ok(&text).warnings.is_empty());
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = load_ok(&text);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("source.uri_file") && c.warnings[0].contains("readable by"),
        "{:?}",
        c.warnings
    );
    assert!(!c.warnings[0].contains("s3cr3t"), "{:?}", c.warnings);
}

#[test]
fn unknown_section_from_env_names_the_variable_not_the_file() {
    // The unknown key is the section itself; the variable sets a key below it.
    let err =
        load_from_str_with_env(&minimal(), env(&[("MONGO_SYNCD_SOURCES__URI", "x")])).unwrap_err();
    assert_field(
        &err,
        "sources",
        "from environment variable MONGO_SYNCD_SOURCES__URI",
    );
    assert!(!err.to_string().contains("config text"), "{err}");
    // A variable nested below an unknown key of a known section.
    let err = load_from_str_with_env(&minimal(), env(&[("MONGO_SYNCD_APPLY__BATCH__MAX", "3")]))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("from environment variable MONGO_SYNCD_APPLY__BATCH__MAX"),
        "{err}"
    );
}

#[test]
fn rename_collisions_with_unrenamed_sources_are_rejected_statically() {
    // `a` becomes `b` while `b` itself is synced under its own name: a.x and b.x would merge.
    let err = load_err(&with(
        "[sync]\nnamespaces = [\"a.*\", \"b.*\"]\n[sync.rename]\na = \"b\"\n",
    ));
    assert_field(
        &err,
        "sync.rename.\"a\"",
        "collides with source database \"b\"",
    );
    // Same for one collection.
    let err = load_err(&with(
        "[sync]\nnamespaces = [\"a.x\", \"b.y\"]\n[sync.rename]\n\"a.x\" = \"b.y\"\n",
    ));
    assert_field(
        &err,
        "sync.rename.\"a.x\"",
        "collides with source namespace \"b.y\"",
    );
    // A collection renamed into a database that another database is renamed to.
    let err = load_err(&with(
        "[sync]\nnamespaces = [\"a.*\", \"c.x\"]\n[sync.rename]\na = \"b\"\n\"c.x\" = \"b.x\"\n",
    ));
    assert_field(&err, "sync.rename.\"c.x\"", "collides");
    // Not visible statically (wildcards): accepted, discovery parks the collision.
    load_ok(&with("[sync.rename]\na = \"b\"\n"));
    // Renamed away: no collision.
    load_ok(&with(
        "[sync]\nnamespaces = [\"a.*\", \"b.*\"]\n[sync.rename]\na = \"b\"\nb = \"c\"\n",
    ));
    // A collection of `b` renamed elsewhere frees its name.
    load_ok(&with(
        "[sync]\nnamespaces = [\"a.x\", \"b.x\"]\n[sync.rename]\n\"a.x\" = \"b.x\"\n\"b.x\" = \"c.x\"\n",
    ));
}

#[test]
fn the_stream_plan_is_a_source_key_with_documented_defaults() {
    let cfg = load_ok(&minimal());
    assert_eq!(cfg.source.stream_scope(), StreamScope::Auto);
    assert_eq!(
        cfg.source.collection_streams_max(),
        DEFAULT_COLLECTION_STREAMS_MAX
    );
    let with_source = |keys: &str| minimal().replace("[source]\n", &format!("[source]\n{keys}\n"));
    let cfg = load_ok(&with_source(
        "stream_scope = \"deployment\"\ncollection_streams_max = 0",
    ));
    assert_eq!(cfg.source.stream_scope(), StreamScope::Deployment);
    assert_eq!(cfg.source.collection_streams_max(), 0);
    for scope in ["collection", "database", "auto"] {
        load_ok(&with_source(&format!("stream_scope = \"{scope}\"")));
    }
    let err = load_err(&with_source("stream_scope = \"cluster\""));
    assert!(err.to_string().contains("stream_scope"), "{err}");
    let err = load_err(&with_source("collection_streams_max = 100001"));
    assert_field(&err, "source.collection_streams_max", "at most");
    let err = load_err(&minimal().replace(
        "[destination]\n",
        "[destination]\nstream_scope = \"deployment\"\n",
    ));
    assert_field(&err, "destination.stream_scope", "[source] key");
    // check-config shows the effective plan.
    let shown = serde_json::to_value(load_ok(&minimal()).redacted()).unwrap();
    assert_eq!(shown["source"]["stream_scope"], "auto");
    assert_eq!(shown["source"]["collection_streams_max"], 16);
}

#[tokio::test]
async fn idle_pooled_connections_close_after_a_documented_default() {
    async fn idle(c: &Config) -> (Option<Duration>, Option<Duration>) {
        let src = c.source_client_options().await.unwrap();
        let dst = c.destination_client_options().await.unwrap();
        (src.max_idle_time, dst.max_idle_time)
    }
    let default = Some(Duration::from_millis(DEFAULT_MAX_IDLE_TIME_MS));
    assert_eq!(idle(&load_ok(&minimal())).await, (default, default));
    // The URI's value applies when the key is unset; the key wins over it.
    let c = load_ok(&format!(
        "[source]\nuri = \"{SRC}&maxIdleTimeMS=1500\"\n[destination]\nuri = \"{DST}\"\nmax_idle_time_ms = 2500\n"
    ));
    assert_eq!(
        idle(&c).await,
        (
            Some(Duration::from_millis(1500)),
            Some(Duration::from_millis(2500))
        )
    );
    // 0 means "never closed for idleness", from the key and from the URI alike (the driver
    // alone would close every connection as it is checked in).
    let c = load_ok(&format!(
        "[source]\nuri = \"{SRC}&maxIdleTimeMS=0\"\n[destination]\nuri = \"{DST}\"\nmax_idle_time_ms = 0\n"
    ));
    assert_eq!(idle(&c).await, (None, None));
    let shown = serde_json::to_value(load_ok(&minimal()).redacted()).unwrap();
    assert_eq!(
        shown["source"]["max_idle_time_ms"],
        DEFAULT_MAX_IDLE_TIME_MS
    );
}

#[test]
fn copies_at_once_are_bounded_by_a_documented_default() {
    let cfg = load_ok(&minimal());
    assert_eq!(
        cfg.copy.concurrent_collections,
        DEFAULT_COPY_CONCURRENT_COLLECTIONS
    );
    let cfg = load_ok(&format!(
        "{}\n[copy]\nconcurrent_collections = 12\n",
        minimal()
    ));
    assert_eq!(cfg.copy.concurrent_collections, 12);
    for bad in ["0", "257"] {
        let err = load_err(&format!(
            "{}\n[copy]\nconcurrent_collections = {bad}\n",
            minimal()
        ));
        assert_field(&err, "copy.concurrent_collections", "between 1 and 256");
    }
    let err = load_err(&format!("{}\n[copy]\nparallel = 2\n", minimal()));
    assert!(err.to_string().contains("parallel"), "{err}");
    let shown = serde_json::to_value(load_ok(&minimal()).redacted()).unwrap();
    assert_eq!(shown["copy"]["concurrent_collections"], 4);
}

#[test]
fn transactions_are_applied_per_document_unless_atomic_is_asked_for_with_a_shared_stream() {
    let cfg = load_ok(&minimal());
    assert_eq!(cfg.apply.transactions, TransactionMode::PerDocument);
    let shown = serde_json::to_value(cfg.redacted()).unwrap();
    assert_eq!(shown["apply"]["transactions"], "per-document");
    let cfg = load_ok(&format!(
        "{}\n[apply]\ntransactions = \"atomic\"\n",
        minimal()
    ));
    assert_eq!(cfg.apply.transactions, TransactionMode::Atomic);
    let err = load_err(&format!(
        "{}\n[apply]\ntransactions = \"all-or-nothing\"\n",
        minimal()
    ));
    assert!(err.to_string().contains("transactions"), "{err}");
    // A collection stream sees one collection of a transaction: atomic needs a shared one.
    let with_scope = |scope: &str| {
        minimal().replacen(
            "[source]\n",
            &format!("[source]\nstream_scope = \"{scope}\"\n"),
            1,
        ) + "\n[apply]\ntransactions = \"atomic\"\n"
    };
    let err = load_err(&with_scope("collection"));
    assert_field(&err, "apply.transactions", "shared change stream");
    for scope in ["auto", "database", "deployment"] {
        load_ok(&with_scope(scope));
    }
}

#[test]
fn a_collection_is_copied_in_a_documented_number_of_range_lanes() {
    let cfg = load_ok(&minimal());
    assert_eq!(cfg.copy.parallel_ranges, DEFAULT_COPY_PARALLEL_RANGES);
    let shown = serde_json::to_value(cfg.redacted()).unwrap();
    assert_eq!(shown["copy"]["parallel_ranges"], 4);
    let cfg = load_ok(&format!("{}\n[copy]\nparallel_ranges = 1\n", minimal()));
    assert_eq!(cfg.copy.parallel_ranges, 1);
    for bad in ["0", "65"] {
        let err = load_err(&format!("{}\n[copy]\nparallel_ranges = {bad}\n", minimal()));
        assert_field(&err, "copy.parallel_ranges", "between 1 and 64");
    }
}

#[test]
fn partitions_with_overrides_split_the_namespaces_and_a_term_sees_only_its_own() {
    let mut config = load_ok(&with(
        "socket_timeout_ms = 1000\n[ha]\nenabled = true\nlease_seconds = 3\npartitions = 4\n\
         [[ha.partition_overrides]]\nnamespaces = \"app.orders\"\npartition = 3\n",
    ));
    let partitioner = config.partitioner();
    assert_eq!(partitioner.count(), 4);
    assert_eq!(partitioner.partition_of("app", "orders"), 3);
    assert!(config.namespace_filter().matches("app", "orders"));
    config.ha.term_partition = Some(3);
    assert!(config.namespace_filter().matches("app", "orders"));
    config.ha.term_partition = Some(2);
    assert!(!config.namespace_filter().matches("app", "orders"));
    let spread: std::collections::BTreeSet<u32> = (0..40)
        .map(|i| partitioner.partition_of("app", &format!("c{i}")))
        .collect();
    assert_eq!(spread.len(), 4, "40 collections reach every partition");
}

#[test]
fn partitions_need_ha_and_overrides_must_name_an_existing_partition() {
    let err = load_err(&with("[ha]\npartitions = 2\n"));
    assert_field(&err, "ha.partitions", "needs ha.enabled");
    let err = load_err(&with(
        "socket_timeout_ms = 1000\n[ha]\nenabled = true\nlease_seconds = 3\npartitions = 0\n",
    ));
    assert_field(&err, "ha.partitions", "between 1 and 256");
    let err = load_err(&with(
        "socket_timeout_ms = 1000\n[ha]\nenabled = true\nlease_seconds = 3\npartitions = 257\n",
    ));
    assert_field(&err, "ha.partitions", "between 1 and 256");
    let err = load_err(&with(
        "socket_timeout_ms = 1000\n[ha]\nenabled = true\nlease_seconds = 3\npartitions = 2\n\
         [[ha.partition_overrides]]\nnamespaces = \"app.*\"\npartition = 2\n",
    ));
    assert_field(
        &err,
        "ha.partition_overrides[0].partition",
        "below ha.partitions",
    );
    let err = load_err(&with(
        "[ha]\n[[ha.partition_overrides]]\nnamespaces = \"app.*\"\npartition = 0\nweight = 2\n",
    ));
    assert!(err.to_string().contains("weight"), "{err}");
}

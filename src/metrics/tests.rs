use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use super::*;

/// One parsed sample line of the text format.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A minimal parser of what `TextEncoder` writes (no escapes in our label values).
pub(crate) fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line");
            types.insert(name.to_owned(), ty.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().expect("sample value"),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("label pair");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && s.labels.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    find(samples, name, labels)
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
        .value
}

fn namespaces_of(samples: &[Sample]) -> std::collections::BTreeSet<String> {
    samples
        .iter()
        .filter_map(|s| s.labels.get(LABEL_NAMESPACE).cloned())
        .collect()
}

/// A populated registry: every metric has at least one series.
pub(crate) fn sample_metrics() -> Metrics {
    let m = Metrics::new(DEFAULT_MAX_NAMESPACES);
    let now = SystemTime::now();
    let unix = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (i, ns) in ["shop.orders", "shop.customers", "inventory.items"]
        .into_iter()
        .enumerate()
    {
        let k = i as u64 + 1;
        m.register_namespace(ns);
        m.events_read(ns, 100 * k);
        m.events_applied(ns, ApplyOp::Insert, 50 * k);
        m.events_applied(ns, ApplyOp::Update, 30 * k);
        m.events_applied(ns, ApplyOp::Delete, 10 * k);
        m.events_applied(ns, ApplyOp::Replace, 5 * k);
        m.events_applied(ns, ApplyOp::Ddl, 1);
        m.writes(ns, 96 * k);
        m.replay_skipped(ns, 2);
        m.already_applied(ns, 1);
        m.set_queue(ns, 3 * k);
        m.set_lag(ns, 0.5 * k as f64);
        m.set_applied_through(ns, unix - 0.5 * k as f64);
        m.record_checkpoint(ns, now - Duration::from_secs(k));
        m.set_worker_state(ns, WorkerState::Streaming);
        m.copied(ns, 1000 * k);
        m.set_copy_estimate(ns, 1000 * k);
        m.validation_run(ns, ValidationResult::Match);
        m.set_validation_mismatched(ns, 0);
        m.set_validation_last_success(ns, unix - 60.0);
        m.register_conflict_policy(ns, ConflictPolicyLabel::DestinationWins);
        m.conflict(
            ns,
            ConflictPolicyLabel::DestinationWins,
            ConflictOutcome::Skipped,
        );
        m.error(ns, ErrorKindLabel::Transient);
        m.dead_letter(ns);
        m.worker_restart(ns);
    }
    m.set_worker_state("inventory.items", WorkerState::Copying);
    m.set_source_cluster_time(unix);
    m.set_source_connected(true);
    m.set_destination_connected(true);
    m.force_sync(Trigger::Signal);
    m.config_reload(ReloadResult::Success);
    for i in 0..50 {
        m.observe_batch(Duration::from_millis(2 * i));
        m.observe_replication_latency(0.01 * i as f64);
    }
    m
}

/// (name, TYPE) of every DESIGN §6 metric plus the documented additions.
pub(crate) const EXPECTED_TYPES: &[(&str, &str)] = &[
    (BUILD_INFO, "gauge"),
    (LAG_SECONDS, "gauge"),
    (APPLIED_THROUGH_TIMESTAMP_SECONDS, "gauge"),
    (SOURCE_CLUSTER_TIME_SECONDS, "gauge"),
    (REPLICATION_LATENCY_SECONDS, "histogram"),
    (EVENTS_READ_TOTAL, "counter"),
    (EVENTS_APPLIED_TOTAL, "counter"),
    (WRITES_TOTAL, "counter"),
    (REPLAY_SKIPPED_TOTAL, "counter"),
    (EVENTS_ALREADY_APPLIED_TOTAL, "counter"),
    (APPLY_BATCH_DURATION_SECONDS, "histogram"),
    (QUEUE_EVENTS, "gauge"),
    (CHECKPOINT_AGE_SECONDS, "gauge"),
    (WORKER_STATE, "gauge"),
    (WORKER_RESTARTS_TOTAL, "counter"),
    (ERRORS_TOTAL, "counter"),
    (INITIAL_SYNC_DOCUMENTS_COPIED_TOTAL, "counter"),
    (INITIAL_SYNC_DOCUMENTS_ESTIMATED, "gauge"),
    (VALIDATION_RUNS_TOTAL, "counter"),
    (VALIDATION_MISMATCHED_DOCUMENTS, "gauge"),
    (VALIDATION_LAST_SUCCESS_TIMESTAMP_SECONDS, "gauge"),
    (CONFLICTS_TOTAL, "counter"),
    (DEAD_LETTERS_TOTAL, "counter"),
    (FORCE_SYNCS_TOTAL, "counter"),
    (SOURCE_CONNECTED, "gauge"),
    (DESTINATION_CONNECTED, "gauge"),
    (CONFIG_RELOADS_TOTAL, "counter"),
    (START_TIME_SECONDS, "gauge"),
    (OVERFLOW_NAMESPACES, "gauge"),
    (IDENTITY_MISMATCH, "gauge"),
    (DESTINATION_RESETS_TOTAL, "counter"),
    (MASS_DELETE_GUARD_TOTAL, "counter"),
    (BUFFERED_BYTES, "gauge"),
    (BUFFER_BUDGET_BYTES, "gauge"),
    (CONNECTIONS, "gauge"),
    (TRANSACTION_PARTS_TOTAL, "counter"),
    (WRITE_LANES, "gauge"),
];

#[test]
fn design_names_are_exactly_the_contract() {
    // DESIGN §6, spelled out literally so a renamed constant fails here.
    let design = [
        "build_info",
        "lag_seconds",
        "applied_through_timestamp_seconds",
        "source_cluster_time_seconds",
        "replication_latency_seconds",
        "events_read_total",
        "events_applied_total",
        "writes_total",
        "replay_skipped_total",
        "apply_batch_duration_seconds",
        "queue_events",
        "checkpoint_age_seconds",
        "worker_state",
        "worker_restarts_total",
        "errors_total",
        "initial_sync_documents_copied_total",
        "initial_sync_documents_estimated",
        "validation_runs_total",
        "validation_mismatched_documents",
        "validation_last_success_timestamp_seconds",
        "conflicts_total",
        "dead_letters_total",
        "force_syncs_total",
        "source_connected",
        "destination_connected",
    ];
    for short in design {
        let full = format!("mongo_syncd_{short}");
        assert!(METRIC_NAMES.contains(&full.as_str()), "{full}");
    }
}

#[test]
fn content_type_is_text_0_0_4() {
    assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4");
    use prometheus::Encoder as _;
    assert_eq!(CONTENT_TYPE, prometheus::TextEncoder::new().format_type());
}

#[test]
fn build_info_and_fixed_series_exist_from_the_start() {
    let m = Metrics::new(10);
    let (_, s) = parse(&m.render());
    assert_eq!(
        value(
            &s,
            BUILD_INFO,
            &[(LABEL_VERSION, env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(value(&s, SOURCE_CONNECTED, &[]), 0.0);
    assert_eq!(value(&s, DESTINATION_CONNECTED, &[]), 0.0);
    assert_eq!(
        value(&s, FORCE_SYNCS_TOTAL, &[(LABEL_TRIGGER, "signal")]),
        0.0
    );
    assert_eq!(
        value(&s, FORCE_SYNCS_TOTAL, &[(LABEL_TRIGGER, "http")]),
        0.0
    );
    assert_eq!(value(&s, OVERFLOW_NAMESPACES, &[]), 0.0);
    assert!(value(&s, START_TIME_SECONDS, &[]) > 1.6e9);
    // Unknown until the first hello: absent rather than "1970".
    assert!(find(&s, SOURCE_CLUSTER_TIME_SECONDS, &[]).is_none());
    m.set_source_cluster_time(1_700_000_000.5);
    m.set_source_connected(true);
    let (_, s) = parse(&m.render());
    assert_eq!(value(&s, SOURCE_CLUSTER_TIME_SECONDS, &[]), 1_700_000_000.5);
    assert_eq!(value(&s, SOURCE_CONNECTED, &[]), 1.0);
}

#[test]
fn register_namespace_pre_initialises_series_at_zero() {
    let m = Metrics::new(10);
    m.register_namespace("db.c");
    let (_, s) = parse(&m.render());
    let ns = (LABEL_NAMESPACE, "db.c");
    for op in ApplyOp::ALL {
        assert_eq!(
            value(&s, EVENTS_APPLIED_TOTAL, &[ns, (LABEL_OP, op.as_str())]),
            0.0
        );
    }
    for kind in ErrorKindLabel::ALL {
        assert_eq!(
            value(&s, ERRORS_TOTAL, &[ns, (LABEL_KIND, kind.as_str())]),
            0.0
        );
    }
    for result in ValidationResult::ALL {
        assert_eq!(
            value(
                &s,
                VALIDATION_RUNS_TOTAL,
                &[ns, (LABEL_RESULT, result.as_str())]
            ),
            0.0
        );
    }
    for name in [
        EVENTS_READ_TOTAL,
        WRITES_TOTAL,
        REPLAY_SKIPPED_TOTAL,
        WORKER_RESTARTS_TOTAL,
        INITIAL_SYNC_DOCUMENTS_COPIED_TOTAL,
        DEAD_LETTERS_TOTAL,
    ] {
        assert_eq!(value(&s, name, &[ns]), 0.0, "{name}");
    }
    assert_eq!(
        value(&s, WORKER_STATE, &[ns, (LABEL_STATE, "stopped")]),
        1.0
    );
    assert_eq!(
        value(&s, WRITE_LANES, &[ns]),
        1.0,
        "one write lane until the worker reports its own"
    );
    // Gauges whose "nothing happened yet" value is 0 (issue 12: dashboards never say
    // "No data" on a healthy daemon). Lag, recovery point and checkpoint age have no such
    // value: the worker reports them before /readyz can say 200.
    for name in [
        QUEUE_EVENTS,
        INITIAL_SYNC_DOCUMENTS_ESTIMATED,
        VALIDATION_MISMATCHED_DOCUMENTS,
        VALIDATION_LAST_SUCCESS_TIMESTAMP_SECONDS,
    ] {
        assert_eq!(value(&s, name, &[ns]), 0.0, "{name}");
    }
    // Conflicts only for the policy the namespace uses.
    assert!(!s.iter().any(|x| x.name == CONFLICTS_TOTAL));
    m.register_conflict_policy("db.c", ConflictPolicyLabel::Journal);
    let (_, s) = parse(&m.render());
    for outcome in ConflictOutcome::ALL {
        assert_eq!(
            value(
                &s,
                CONFLICTS_TOTAL,
                &[
                    ns,
                    (LABEL_POLICY, "journal"),
                    (LABEL_OUTCOME, outcome.as_str())
                ]
            ),
            0.0
        );
    }
}

#[test]
fn counters_count_with_typed_labels() {
    let m = Metrics::new(10);
    m.events_read("db.c", 7);
    m.events_read("db.c", 3);
    m.events_applied("db.c", ApplyOp::Replace, 4);
    m.events_applied("db.c", ApplyOp::Ddl, 1);
    m.writes("db.c", 5);
    m.replay_skipped("db.c", 2);
    m.error("db.c", ErrorKindLabel::HistoryLost);
    m.validation_run("db.c", ValidationResult::Unverified);
    m.conflict(
        "db.c",
        ConflictPolicyLabel::NewestWins,
        ConflictOutcome::Applied,
    );
    m.dead_letter("db.c");
    m.dead_letter("db.c");
    m.force_sync(Trigger::Http);
    m.config_reload(ReloadResult::Failure);
    let (_, s) = parse(&m.render());
    let ns = (LABEL_NAMESPACE, "db.c");
    assert_eq!(value(&s, EVENTS_READ_TOTAL, &[ns]), 10.0);
    assert_eq!(
        value(&s, EVENTS_APPLIED_TOTAL, &[ns, (LABEL_OP, "replace")]),
        4.0
    );
    assert_eq!(
        value(&s, EVENTS_APPLIED_TOTAL, &[ns, (LABEL_OP, "ddl")]),
        1.0
    );
    assert_eq!(value(&s, WRITES_TOTAL, &[ns]), 5.0);
    assert_eq!(value(&s, REPLAY_SKIPPED_TOTAL, &[ns]), 2.0);
    assert_eq!(
        value(&s, ERRORS_TOTAL, &[ns, (LABEL_KIND, "history_lost")]),
        1.0
    );
    assert_eq!(
        value(
            &s,
            VALIDATION_RUNS_TOTAL,
            &[ns, (LABEL_RESULT, "unverified")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            CONFLICTS_TOTAL,
            &[
                ns,
                (LABEL_POLICY, "newest-wins"),
                (LABEL_OUTCOME, "applied")
            ]
        ),
        1.0
    );
    assert_eq!(value(&s, DEAD_LETTERS_TOTAL, &[ns]), 2.0);
    assert_eq!(
        value(&s, FORCE_SYNCS_TOTAL, &[(LABEL_TRIGGER, "http")]),
        1.0
    );
    assert_eq!(
        value(&s, CONFIG_RELOADS_TOTAL, &[(LABEL_RESULT, "failure")]),
        1.0
    );
}

#[test]
fn namespaces_beyond_the_cap_aggregate_under_other() {
    let m = Metrics::new(2);
    for ns in ["a.x", "b.x", "c.x", "d.x"] {
        m.events_read(ns, 1);
    }
    m.set_lag("a.x", 1.0);
    m.set_lag("c.x", 7.0);
    m.set_lag("d.x", 3.0);
    m.set_queue("c.x", 4);
    m.set_queue("d.x", 5);
    m.set_applied_through("c.x", 100.0);
    m.set_applied_through("d.x", 90.0);
    m.set_worker_state("c.x", WorkerState::Parked);
    m.set_worker_state("d.x", WorkerState::Streaming);
    m.set_write_lanes("c.x", 4);
    m.set_write_lanes("d.x", 2);
    let (_, s) = parse(&m.render());
    let names = namespaces_of(&s);
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["_other", "a.x", "b.x"],
        "at most max_namespaces own label values, the rest under _other"
    );
    let other = (LABEL_NAMESPACE, OTHER_NAMESPACE);
    assert_eq!(
        value(&s, EVENTS_READ_TOTAL, &[other]),
        2.0,
        "counters add up"
    );
    assert_eq!(value(&s, LAG_SECONDS, &[other]), 7.0, "worst lag");
    assert_eq!(value(&s, QUEUE_EVENTS, &[other]), 9.0, "queues add up");
    assert_eq!(value(&s, WRITE_LANES, &[other]), 4.0, "most write lanes");
    assert_eq!(
        value(&s, APPLIED_THROUGH_TIMESTAMP_SECONDS, &[other]),
        90.0,
        "oldest recovery point"
    );
    assert_eq!(
        value(&s, WORKER_STATE, &[other, (LABEL_STATE, "parked")]),
        1.0
    );
    assert_eq!(
        value(&s, WORKER_STATE, &[other, (LABEL_STATE, "streaming")]),
        1.0
    );
    assert_eq!(value(&s, OVERFLOW_NAMESPACES, &[]), 2.0);

    // A freed slot goes to the next new namespace; those already in _other stay there.
    m.remove_namespace("a.x");
    m.register_namespace("e.x");
    m.events_read("c.x", 1);
    let (_, s) = parse(&m.render());
    assert_eq!(
        namespaces_of(&s).into_iter().collect::<Vec<_>>(),
        ["_other", "b.x", "e.x"]
    );
    assert_eq!(value(&s, EVENTS_READ_TOTAL, &[other]), 3.0);
}

#[test]
fn zero_cap_puts_everything_under_other() {
    let m = Metrics::new(0);
    m.set_lag("a.x", 2.0);
    let (_, s) = parse(&m.render());
    assert_eq!(
        namespaces_of(&s).into_iter().collect::<Vec<_>>(),
        ["_other"]
    );
}

#[test]
fn remove_namespace_removes_every_series() {
    let m = sample_metrics();
    m.remove_namespace("shop.orders");
    let (_, s) = parse(&m.render());
    assert!(
        !s.iter()
            .any(|x| x.labels.get(LABEL_NAMESPACE).map(String::as_str) == Some("shop.orders")),
        "series of shop.orders left"
    );
    assert!(namespaces_of(&s).contains("shop.customers"));
    // Removing twice or removing an unknown namespace is harmless.
    m.remove_namespace("shop.orders");
    m.remove_namespace("never.seen");
}

#[test]
fn a_removed_namespace_stays_removed_until_registered_again() {
    let m = sample_metrics();
    m.remove_namespace("shop.orders");
    // A worker that is still draining reports after its namespace was removed.
    m.set_worker_state("shop.orders", WorkerState::Stopped);
    m.events_read("shop.orders", 1);
    m.set_lag("shop.orders", 1.0);
    let (_, s) = parse(&m.render());
    assert!(
        !namespaces_of(&s).contains("shop.orders"),
        "late reports recreated series"
    );
    // Synced again (a reload put it back in scope): registering brings it back at zero.
    m.register_namespace("shop.orders");
    m.events_read("shop.orders", 2);
    let (_, s) = parse(&m.render());
    let ns = (LABEL_NAMESPACE, "shop.orders");
    assert_eq!(value(&s, EVENTS_READ_TOTAL, &[ns]), 2.0);
}

#[test]
fn removing_the_last_overflow_namespace_removes_other() {
    let m = Metrics::new(1);
    m.register_namespace("a.x");
    m.register_namespace("b.x");
    m.register_namespace("c.x");
    m.conflict(
        "c.x",
        ConflictPolicyLabel::Journal,
        ConflictOutcome::Journaled,
    );
    m.set_lag("b.x", 1.0);
    m.remove_namespace("b.x");
    let (_, s) = parse(&m.render());
    assert!(
        namespaces_of(&s).contains(OTHER_NAMESPACE),
        "c.x still there"
    );
    m.remove_namespace("c.x");
    let (_, s) = parse(&m.render());
    assert_eq!(namespaces_of(&s).into_iter().collect::<Vec<_>>(), ["a.x"]);
}

#[test]
fn worker_state_is_one_hot() {
    let m = Metrics::new(10);
    for state in WorkerState::ALL {
        m.set_worker_state("db.c", *state);
        let (_, s) = parse(&m.render());
        let series: Vec<_> = s.iter().filter(|x| x.name == WORKER_STATE).collect();
        assert_eq!(series.len(), WorkerState::ALL.len());
        for x in series {
            let expected = if x.labels[LABEL_STATE] == state.as_str() {
                1.0
            } else {
                0.0
            };
            assert_eq!(x.value, expected, "{state}: {x:?}");
        }
    }
}

#[test]
fn checkpoint_age_is_computed_at_scrape_time() {
    let m = Metrics::new(10);
    let ns = [(LABEL_NAMESPACE, "db.c")];
    assert!(find(&parse(&m.render()).1, CHECKPOINT_AGE_SECONDS, &ns).is_none());
    m.record_checkpoint("db.c", SystemTime::now() - Duration::from_secs(5));
    let first = value(&parse(&m.render()).1, CHECKPOINT_AGE_SECONDS, &ns);
    assert!((5.0..6.0).contains(&first), "{first}");
    std::thread::sleep(Duration::from_millis(30));
    let second = value(&parse(&m.render()).1, CHECKPOINT_AGE_SECONDS, &ns);
    assert!(second >= first + 0.02, "{first} -> {second}");
    // A newer checkpoint resets it; one in the future (clock step) reads 0, never negative.
    m.record_checkpoint("db.c", SystemTime::now() + Duration::from_secs(60));
    assert_eq!(
        value(&parse(&m.render()).1, CHECKPOINT_AGE_SECONDS, &ns),
        0.0
    );
    // gather() without render() computes it too (any HTTP handler gets it right).
    let families = m.registry().gather();
    assert!(families.iter().any(|f| f.name() == CHECKPOINT_AGE_SECONDS));
}

#[test]
fn replication_latency_clamps_negative_values() {
    let m = Metrics::new(10);
    m.observe_replication_latency(-3.0);
    m.observe_replication_latency(f64::NAN);
    m.observe_replication_latency(2.0);
    m.observe_replication_latency(7200.0);
    m.observe_replication_latency_since(SystemTime::now() + Duration::from_secs(30));
    let (_, s) = parse(&m.render());
    let bucket = |le: &str| {
        value(
            &s,
            &format!("{REPLICATION_LATENCY_SECONDS}_bucket"),
            &[("le", le)],
        )
    };
    assert_eq!(bucket("0.005"), 3.0, "negative, NaN and future count as 0");
    assert_eq!(bucket("3600"), 4.0);
    assert_eq!(bucket("+Inf"), 5.0);
    assert_eq!(
        value(&s, &format!("{REPLICATION_LATENCY_SECONDS}_sum"), &[]),
        7202.0
    );
    assert_eq!(*REPLICATION_LATENCY_BUCKETS.last().unwrap(), 3600.0);
}

#[test]
fn lag_is_never_negative() {
    let m = Metrics::new(10);
    m.set_lag("db.c", -4.0);
    let (_, s) = parse(&m.render());
    assert_eq!(value(&s, LAG_SECONDS, &[(LABEL_NAMESPACE, "db.c")]), 0.0);
}

#[test]
fn instances_are_independent() {
    let a = Metrics::new(10);
    let b = Metrics::new(10);
    a.events_read("db.c", 1);
    assert!(!b.render().contains("db.c"));
    // Clones share series.
    let c = a.clone();
    c.events_read("db.c", 1);
    let (_, s) = parse(&a.render());
    assert_eq!(
        value(&s, EVENTS_READ_TOTAL, &[(LABEL_NAMESPACE, "db.c")]),
        2.0
    );
}

#[test]
fn label_enums_match_design() {
    let names = |all: &[&str]| all.join(",");
    assert_eq!(
        names(&ApplyOp::ALL.iter().map(|x| x.as_str()).collect::<Vec<_>>()),
        "insert,update,replace,delete,ddl"
    );
    assert_eq!(
        names(
            &WorkerState::ALL
                .iter()
                .map(|x| x.as_str())
                .collect::<Vec<_>>()
        ),
        "copying,streaming,backoff,parked,stopped"
    );
    assert_eq!(
        names(
            &ErrorKindLabel::ALL
                .iter()
                .map(|x| x.as_str())
                .collect::<Vec<_>>()
        ),
        "transient,history_lost,document"
    );
    assert_eq!(
        names(
            &ValidationResult::ALL
                .iter()
                .map(|x| x.as_str())
                .collect::<Vec<_>>()
        ),
        "match,mismatch,unverified,error"
    );
    assert_eq!(ConflictOutcome::Journaled.to_string(), "journaled");
    assert_eq!(Trigger::Signal.to_string(), "signal");
}

/// The exposition passes `promtool check metrics` with no findings (DESIGN §6). CI runs the
/// same lint against the live daemon (`.ci/checks/promtool-metrics.sh`).
#[test]
fn promtool_check_metrics_is_clean() {
    let text = sample_metrics().render();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            eprintln!("note: promtool not runnable ({error}); skipping the promtool lint");
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "promtool check metrics: {:?}\n{findings}",
        out.status
    );
}

/// Writes a populated exposition to `$MONGO_SYNCD_METRICS_DUMP` (used to exercise the CI checks
/// before the daemon serves `/metrics`): `MONGO_SYNCD_METRICS_DUMP=/tmp/m.prom cargo test
/// -p mongo-syncd --lib metrics::tests::dump_sample_exposition`.
#[test]
fn dump_sample_exposition() {
    if let Some(path) = std::env::var_os("MONGO_SYNCD_METRICS_DUMP") {
        std::fs::write(&path, sample_metrics().render()).expect("write dump");
        eprintln!("wrote {}", path.to_string_lossy());
    }
}

#[test]
fn metrics_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Metrics>();

    let m = std::sync::Arc::new(Metrics::new(4));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let m = std::sync::Arc::clone(&m);
            std::thread::spawn(move || {
                for i in 0..200 {
                    let ns = format!("db.c{}", (t + i) % 6);
                    m.events_read(&ns, 1);
                    m.set_lag(&ns, i as f64);
                    if i % 50 == 0 {
                        m.remove_namespace(&ns);
                    }
                    let _ = m.render();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let (_, s) = parse(&m.render());
    // Never more than max_namespaces own label values plus _other.
    let names = namespaces_of(&s);
    assert!(names.len() <= 5, "{names:?}");
}

#[test]
fn a_collector_registered_again_replaces_the_first_in_the_exposition() {
    let metrics = Metrics::new(10);
    let first = prometheus::IntGauge::new("mongo_syncd_test_replaced", "test").unwrap();
    first.set(1);
    metrics.register_replacing(first.clone());
    let second = prometheus::IntGauge::new("mongo_syncd_test_replaced", "test").unwrap();
    second.set(2);
    metrics.register_replacing(second.clone());
    first.set(7);
    let text = metrics.render();
    assert!(text.contains("mongo_syncd_test_replaced 2"), "{text}");
    assert!(!text.contains("mongo_syncd_test_replaced 7"), "{text}");
}

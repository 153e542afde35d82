//! The real binary's configuration and command-line behaviour: `check-config` output, exit codes
//! and error messages (DESIGN §3, §4, §7).

use std::path::Path;

use crate::support::{run, run_with_env, write_file};

const SRC_PASSWORD: &str = "src-PW-5f0e1c";
const DST_PASSWORD: &str = "dst-PW-9a7b22";
const TOKEN: &str = "api-TOKEN-c41d";

fn valid_config() -> String {
    format!(
        r#"
[source]
uri = "mongodb://syncer:{SRC_PASSWORD}@src1.example.net:27017,src2.example.net:27017/?replicaSet=rs0&authSource=admin"

[destination]
uri = "mongodb://writer:{DST_PASSWORD}@dst1.example.net:27017/?replicaSet=dr0"

[sync]
namespaces = ["shop.*", "crm.contacts"]
rename = {{ "shop" = "shop_dr" }}

[http]
token = "{TOKEN}"
"#
    )
}

fn assert_no_secrets(text: &str) {
    for secret in [SRC_PASSWORD, DST_PASSWORD, TOKEN] {
        assert!(
            !text.contains(secret),
            "secret {secret:?} leaked in:\n{text}"
        );
    }
}

#[test]
fn check_config_prints_the_effective_config_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "syncd.toml", &valid_config());
    let out = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_no_secrets(&out.stdout);
    assert_no_secrets(&out.stderr);
    assert!(
        out.stdout.contains(
            "uri = \"mongodb://syncer:***@src1.example.net:27017,src2.example.net:27017/?replicaSet=rs0&authSource=admin\""
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("uri = \"mongodb://writer:***@dst1.example.net:27017/?replicaSet=dr0\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("token = \"***\""), "{}", out.stdout);
    // Effective values include defaults that were not in the file.
    let table: toml::Table = out.stdout.parse().expect("check-config prints TOML");
    assert_eq!(table["apply"]["batch_max_events"].as_integer(), Some(1000));
    assert_eq!(
        table["checkpoint"]["database"].as_str(),
        Some("mongo_syncd")
    );
    assert_eq!(table["sync"]["rename"]["shop"].as_str(), Some("shop_dr"));
    assert_eq!(table["log"]["format"].as_str(), Some("text"));
}

#[test]
fn check_config_applies_environment_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "syncd.toml", &valid_config());
    let env_uri =
        format!("mongodb://envuser:{SRC_PASSWORD}@env-src.example.net:27017/?replicaSet=rs5");
    let out = run_with_env(
        &["check-config", "--config", path.to_str().unwrap()],
        &[
            ("MONGO_SYNCD_SOURCE__URI", env_uri.as_str()),
            ("MONGO_SYNCD_APPLY__BATCH_MAX_EVENTS", "5"),
        ],
        None,
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_no_secrets(&out.stdout);
    assert_no_secrets(&out.stderr);
    assert!(
        out.stdout
            .contains("mongodb://envuser:***@env-src.example.net:27017/?replicaSet=rs5"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("batch_max_events = 5"),
        "{}",
        out.stdout
    );
}

#[test]
fn check_config_reads_uri_files_without_printing_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = write_file(
        dir.path(),
        "source-uri",
        &format!("mongodb://syncer:{SRC_PASSWORD}@src1.example.net/?replicaSet=rs0\n"),
    );
    write_file(
        dir.path(),
        "destination-uri",
        &format!("mongodb://writer:{DST_PASSWORD}@dst1.example.net/?replicaSet=dr0\n"),
    );
    let config = format!(
        "[source]\nuri_file = \"{}\"\n[destination]\nuri_file = \"destination-uri\"\n",
        src.display()
    );
    let path = write_file(dir.path(), "syncd.toml", &config);
    let out = run(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_no_secrets(&out.stdout);
    assert_no_secrets(&out.stderr);
    assert!(
        out.stdout
            .contains("mongodb://syncer:***@src1.example.net/?replicaSet=rs0"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("source-uri"), "{}", out.stdout);
}

#[test]
fn shipped_dev_config_passes_check_config() {
    let dev = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev.toml");
    let out = run(&["check-config", "--config", dev.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(!out.stdout.contains("dev-token"), "{}", out.stdout);
}

/// Runs `check-config` on `config` (with `env`) and expects exit 78 and a message naming `key`.
fn expect_invalid(config: &str, env: &[(&str, &str)], key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "syncd.toml", config);
    let out = run_with_env(
        &["check-config", "--config", path.to_str().unwrap()],
        env,
        None,
    );
    assert_eq!(
        out.code,
        Some(78),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains(key),
        "expected {key:?} in stderr: {}",
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for a bad config: {}",
        out.stdout
    );
    assert_no_secrets(&out.stderr);
    // One clear line.
    assert_eq!(out.stderr.trim_end().lines().count(), 1, "{}", out.stderr);
    out.stderr
}

#[test]
fn unknown_key_in_file_exits_78_naming_it() {
    let config = valid_config().replace("[sync]\n", "[sync]\nnamespace = [\"a.*\"]\n");
    let stderr = expect_invalid(&config, &[], "sync.namespace");
    assert!(stderr.contains("unknown key"), "{stderr}");
}

#[test]
fn unknown_key_in_env_exits_78_naming_the_variable() {
    let stderr = expect_invalid(
        &valid_config(),
        &[("MONGO_SYNCD_SOURCE__URL", "mongodb://x")],
        "source.url",
    );
    assert!(stderr.contains("MONGO_SYNCD_SOURCE__URL"), "{stderr}");
}

#[test]
fn missing_uri_exits_78() {
    let config = valid_config().replace("[destination]\nuri = ", "[destination]\napp_name = ");
    expect_invalid(&config, &[], "destination.uri");
}

#[test]
fn malformed_uri_exits_78_without_echoing_the_password() {
    let config = valid_config().replace("src1.example.net:27017,", "src1.example.net:99999,");
    let stderr = expect_invalid(&config, &[], "source.uri");
    assert!(stderr.contains("connection string"), "{stderr}");
}

#[test]
fn weak_write_concern_exits_78() {
    let config = valid_config().replace("replicaSet=dr0", "replicaSet=dr0&w=1");
    expect_invalid(&config, &[], "destination.uri");
}

#[test]
fn unreadable_uri_file_exits_78_naming_key_and_path() {
    let config = valid_config().replace(
        &format!(
            "uri = \"mongodb://syncer:{SRC_PASSWORD}@src1.example.net:27017,src2.example.net:27017/?replicaSet=rs0&authSource=admin\""
        ),
        "uri_file = \"/nonexistent/mongo-syncd/source-uri\"",
    );
    let stderr = expect_invalid(&config, &[], "source.uri_file");
    assert!(
        stderr.contains("/nonexistent/mongo-syncd/source-uri"),
        "{stderr}"
    );
}

#[test]
fn missing_config_file_exits_78() {
    let out = run(&["check-config", "--config", "/nonexistent/mongo-syncd.toml"]);
    assert_eq!(out.code, Some(78), "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/mongo-syncd.toml"),
        "{}",
        out.stderr
    );
}

#[test]
fn run_and_validate_reject_a_bad_config_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "syncd.toml", "[source]\nurii = \"x\"\n");
    for args in [
        vec!["run", "--config", path.to_str().unwrap()],
        vec!["--config", path.to_str().unwrap()],
        vec!["validate", "--config", path.to_str().unwrap(), "--json"],
    ] {
        let out = run(&args);
        assert_eq!(out.code, Some(78), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("source.urii"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// A config whose clusters refuse connections at once: `validate` starts, logs, and gives up.
fn unreachable_config(extra: &str) -> String {
    format!(
        "[source]\nuri = \"mongodb://127.0.0.1:1/?directConnection=true\"\nserver_selection_timeout_ms = 200\n\
         [destination]\nuri = \"mongodb://127.0.0.1:2/?directConnection=true\"\nserver_selection_timeout_ms = 200\n{extra}"
    )
}

#[test]
fn runtime_worker_threads_and_tokio_worker_threads_set_the_runtime_threads() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, env, expected) in [
        (
            "[runtime]\nworker_threads = 3\n",
            vec![],
            "worker_threads=3",
        ),
        (
            "[runtime]\nworker_threads = 3\n",
            vec![("TOKIO_WORKER_THREADS", "2")],
            "worker_threads=3",
        ),
        ("", vec![("TOKIO_WORKER_THREADS", "2")], "worker_threads=2"),
    ] {
        let path = write_file(dir.path(), "syncd.toml", &unreachable_config(extra));
        let out = run_with_env(
            &[
                "validate",
                "--config",
                path.to_str().unwrap(),
                "--wait-seconds",
                "0",
            ],
            &env,
            None,
        );
        let started = out
            .stderr
            .lines()
            .find(|l| l.contains("async runtime started"))
            .unwrap_or_else(|| panic!("{extra:?} {env:?}: no runtime line in {}", out.stderr));
        assert!(started.contains(expected), "{extra:?} {env:?}: {started}");
    }
}

#[test]
fn a_malformed_tokio_worker_threads_exits_78_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "syncd.toml", &unreachable_config(""));
    for value in ["abc", "0", "-2"] {
        let out = run_with_env(
            &["run", "--config", path.to_str().unwrap()],
            &[("TOKIO_WORKER_THREADS", value)],
            None,
        );
        assert_eq!(out.code, Some(78), "{value:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("TOKIO_WORKER_THREADS") && !out.stderr.contains("panicked"),
            "{value:?}: {}",
            out.stderr
        );
    }
    let too_many = write_file(
        dir.path(),
        "many.toml",
        &unreachable_config("[runtime]\nworker_threads = 5000\n"),
    );
    let out = run(&["run", "--config", too_many.to_str().unwrap()]);
    assert_eq!(out.code, Some(78), "{}", out.stderr);
    assert!(
        out.stderr.contains("runtime.worker_threads"),
        "{}",
        out.stderr
    );
}

#[test]
fn help_and_version() {
    let out = run(&["--help"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for word in ["run", "check-config", "validate", "demo", "--config"] {
        assert!(
            out.stdout.contains(word),
            "{word:?} missing from:\n{}",
            out.stdout
        );
    }
    let out = run(&["validate", "--help"]);
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("--wait-seconds") && out.stdout.contains("--json"));
    let out = run(&["run", "--help"]);
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("--reset-identity"), "{}", out.stdout);
    assert!(
        out.stdout.contains("/etc/mongo-syncd/mongo-syncd.toml"),
        "{}",
        out.stdout
    );
    let out = run(&["--version"]);
    assert_eq!(out.code, Some(0));
    assert_eq!(
        out.stdout.trim(),
        format!("mongo-syncd {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--no-such-flag"][..],
        &["check-config", "--bogus"],
        &["frobnicate"],
        &["demo", "--duration-seconds", "soon"],
    ] {
        let out = run(args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("error: "),
            "{args:?}: {}",
            out.stderr
        );
    }
}

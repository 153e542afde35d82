//! Start-up behaviour: an unreachable cluster is waited for (a daemon does not exit because
//! the network blinked), credentials never reach logs or status, and a different source is
//! refused (exit 78) unless `--reset-identity` is given.

use std::time::Duration;

use bson::{doc, Document};
use mongo_sim::MongoSim;

use crate::support::cluster::{free_port, wait_converged, wait_until, Clusters, Daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_source_is_waited_for_with_a_clear_log_line_and_no_credentials() {
    let c = Clusters::start().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = format!(
        "[source]\nuri = \"mongodb://alice:s3cr3t-pw@127.0.0.1:{port}/?replicaSet=late&authSource=admin\"\nserver_selection_timeout_ms = 300\n\n\
         [destination]\nuri = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n{}",
        c.dest.uri(),
        crate::support::cluster::TEST_SETTINGS
    );
    std::fs::write(dir.path().join("mongo-syncd.toml"), config).unwrap();
    let mut d = Daemon::start_with_config(dir.path(), http);
    wait_until(
        "the daemon says what it waits for",
        Duration::from_secs(30),
        || async {
            d.logs()
                .contains("waiting for the source cluster to become reachable")
        },
    )
    .await;
    let status = d.get("/api/v1/status").await.unwrap().1;
    assert!(
        !status.contains("s3cr3t-pw"),
        "status leaks the password: {status}"
    );
    assert!(
        status.contains("alice:***@"),
        "status shows the redacted URI: {status}"
    );
    let (code, _) = d.get("/healthz").await.unwrap();
    assert_eq!(code, 200, "alive while waiting");
    let (code, _) = d.get("/readyz").await.unwrap();
    assert_eq!(code, 503, "not ready while waiting");
    assert!(
        !d.logs().contains("s3cr3t-pw"),
        "logs leak the password:\n{}",
        d.logs()
    );
    assert_eq!(
        d.terminate().await,
        Some(0),
        "SIGTERM while waiting exits cleanly"
    );
    assert!(!d.logs().contains("s3cr3t-pw"));
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_connects_once_a_late_source_comes_up() {
    let c = Clusters::start().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = format!(
        "[source]\nuri = \"mongodb://127.0.0.1:{port}/?replicaSet=late\"\nserver_selection_timeout_ms = 300\n\n\
         [destination]\nuri = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n{}",
        c.dest.uri(),
        crate::support::cluster::TEST_SETTINGS
    );
    std::fs::write(dir.path().join("mongo-syncd.toml"), config).unwrap();
    let mut d = Daemon::start_with_config(dir.path(), http);
    wait_until("waiting log line", Duration::from_secs(30), || async {
        d.logs()
            .contains("waiting for the source cluster to become reachable")
    })
    .await;
    let late = MongoSim::builder()
        .replica_set("late")
        .port(port)
        .start()
        .await
        .unwrap();
    let late_client = mongodb::Client::with_uri_str(late.uri()).await.unwrap();
    late_client
        .database("x")
        .collection::<Document>("y")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    let dst = c.dst.database("x").collection::<Document>("y");
    wait_until(
        "synced after the source came up",
        Duration::from_secs(60),
        || async { dst.find_one(doc! {"_id": 1}).await.unwrap().is_some() },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_source_is_refused_unless_the_identity_is_reset() {
    let c = Clusters::start().await;
    c.src
        .database("a")
        .collection::<Document>("c")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "");
    wait_converged(&c, &[("a", "c")], Duration::from_secs(30)).await;
    assert_eq!(d.terminate().await, Some(0));

    // Same destination, another replica set (even with the same name) as the source.
    let other = MongoSim::builder()
        .replica_set("src")
        .start()
        .await
        .unwrap();
    let other_client = mongodb::Client::with_uri_str(other.uri()).await.unwrap();
    other_client
        .database("a")
        .collection::<Document>("c")
        .insert_one(doc! {"_id": 2})
        .await
        .unwrap();
    let text = std::fs::read_to_string(&d.config_path)
        .unwrap()
        .replace(&c.source.uri(), &other.uri());
    std::fs::write(&d.config_path, text).unwrap();
    d.spawn(&[]);
    assert_eq!(
        d.wait_exit(Duration::from_secs(30)).await,
        Some(78),
        "log:\n{}",
        d.logs()
    );
    assert!(
        d.logs().contains("--reset-identity"),
        "the refusal says how to proceed:\n{}",
        d.logs()
    );

    d.spawn(&["--reset-identity"]);
    let dst = c.dst.database("a").collection::<Document>("c");
    wait_until(
        "the new source is copied",
        Duration::from_secs(60),
        || async {
            let ids: Vec<i32> = {
                use futures::TryStreamExt;
                dst.find(doc! {})
                    .await
                    .unwrap()
                    .try_collect::<Vec<Document>>()
                    .await
                    .unwrap()
                    .iter()
                    .map(|d| d.get_i32("_id").unwrap())
                    .collect()
            };
            ids == vec![2]
        },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_exit_77_and_good_ones_sync() {
    let source = MongoSim::builder()
        .replica_set("secure")
        .auth("syncer", "right-pw")
        .start()
        .await
        .unwrap();
    let c = Clusters::start().await;
    let host = source.host();
    let write = |password: &str, dir: &std::path::Path, http: u16| {
        let config = format!(
            "[source]\nuri = \"mongodb://syncer:{password}@{host}/?replicaSet=secure&authSource=admin\"\n\n\
             [destination]\nuri = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n{}",
            c.dest.uri(),
            crate::support::cluster::TEST_SETTINGS
        );
        std::fs::write(dir.join("mongo-syncd.toml"), config).unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    write("wrong-pw", dir.path(), http);
    let mut d = Daemon::start_with_config(dir.path(), http);
    assert_eq!(
        d.wait_exit(Duration::from_secs(60)).await,
        Some(77),
        "log:\n{}",
        d.logs()
    );
    assert!(
        d.logs().to_lowercase().contains("authentication"),
        "log:\n{}",
        d.logs()
    );
    assert!(
        !d.logs().contains("wrong-pw"),
        "the password must not be logged"
    );

    let admin = mongodb::Client::with_uri_str(format!(
        "mongodb://syncer:right-pw@{host}/?replicaSet=secure&authSource=admin"
    ))
    .await
    .unwrap();
    admin
        .database("s")
        .collection::<Document>("c")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    write("right-pw", dir.path(), http);
    d.spawn(&[]);
    let dst = c.dst.database("s").collection::<Document>("c");
    wait_until(
        "synced with good credentials",
        Duration::from_secs(60),
        || async { dst.find_one(doc! {"_id": 1}).await.unwrap().is_some() },
    )
    .await;
    assert!(!d.all_logs().contains("right-pw"));
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

//! The source as operators see it (issue 10 item 9): a `mongod` that is killed and comes back
//! with its data, and a primary that steps down for a while. Neither is history loss or a new
//! deployment: the daemon waits them out and resumes its streams, with no re-copy.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use bson::{doc, Document};
use mongo_sim::MongoSim;
use mongodb::Client;

use crate::support::cluster::{
    free_port, wait_converged, wait_converged_clients, Clusters, Daemon,
};

const T: Duration = Duration::from_secs(60);

/// A `mongo-sim` process with a data directory (the binary cargo built beside `mongo-syncd`):
/// killed with SIGKILL and started again on the same port, it is the same replica set.
struct SimProcess {
    child: Option<Child>,
    port: u16,
    data_dir: PathBuf,
    log: PathBuf,
}

impl SimProcess {
    fn start(dir: &Path) -> SimProcess {
        let mut p = SimProcess {
            child: None,
            port: free_port(),
            data_dir: dir.join("source-data"),
            log: dir.join("source-sim.log"),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let binary = crate::support::binary().with_file_name("mongo-sim");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--replset", "src", "--data-dir"])
            .arg(&self.data_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?replicaSet=src", self.port)
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Retries `op` until the source accepts it (it may be down or not primary for a while).
async fn until_accepted<F, Fut, T, E>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::IntoFuture<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let started = std::time::Instant::now();
    loop {
        match op().into_future().await {
            Ok(v) => return v,
            Err(_) if started.elapsed() < T => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: still refused after {T:?}: {e}"),
        }
    }
}

/// The source's `replicaSetId` (what the daemon's identity check compares).
async fn replica_set_id(src: &Client) -> bson::oid::ObjectId {
    let admin = src.database("admin");
    let reply = until_accepted("replSetGetConfig", || {
        admin.run_command(doc! {"replSetGetConfig": 1})
    })
    .await;
    reply
        .get_document("config")
        .and_then(|c| c.get_document("settings"))
        .and_then(|s| s.get_object_id("replicaSetId"))
        .unwrap()
}

/// The source's election term (`replSetGetStatus`).
async fn term(src: &Client) -> i64 {
    let admin = src.database("admin");
    let reply = until_accepted("replSetGetStatus", || {
        admin.run_command(doc! {"replSetGetStatus": 1})
    })
    .await;
    match reply.get("term") {
        Some(bson::Bson::Int64(t)) => *t,
        Some(bson::Bson::Int32(t)) => *t as i64,
        other => panic!("no term in replSetGetStatus: {other:?}"),
    }
}

/// Writes the daemon's config for `source_uri` and the destination of `dest`.
fn daemon_config(dir: &Path, source_uri: &str, dest_uri: &str, namespaces: &str) -> u16 {
    let port = free_port();
    let config = format!(
        "[source]\nuri = \"{source_uri}\"\n\n[destination]\nuri = \"{dest_uri}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n[sync]\nnamespaces = [\"{namespaces}\"]\n{}",
        crate::support::cluster::TEST_SETTINGS,
    );
    std::fs::write(dir.join("mongo-syncd.toml"), config).unwrap();
    port
}

/// Neither history loss, nor a re-copy, nor a changed identity, nor a parked worker: one copy.
fn assert_no_recopy(d: &Daemon) {
    let logs = d.all_logs();
    for sign in [
        "history lost",
        "re-copying",
        "identity changed",
        "not the deployment",
        "worker parked",
    ] {
        assert!(
            !logs.contains(sign),
            "the daemon logged {sign:?} across a source restart or step-down:\n{logs}"
        );
    }
    assert_eq!(
        logs.matches("initial copy starting").count(),
        1,
        "one initial copy:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_and_restarted_with_its_data_is_resumed_without_a_recopy() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = SimProcess::start(dir.path());
    let dest = MongoSim::builder()
        .replica_set("dst")
        .noop_interval(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let src = Client::with_uri_str(source.uri()).await.unwrap();
    let dst = Client::with_uri_str(dest.uri()).await.unwrap();
    let docs = src.database("rs").collection::<Document>("items");
    until_accepted("seeding the source", || {
        docs.insert_many((0..200).map(|i| doc! {"_id": i, "v": 0}))
    })
    .await;
    let port = daemon_config(dir.path(), &source.uri(), &dest.uri(), "rs.*");
    let mut d = Daemon::start_with_config(dir.path(), port);
    let converged = || wait_converged_clients(&src, &dst, &[("rs", "items")], T);
    converged().await;
    d.wait_streaming("rs.items").await;

    // Writes the daemon has streamed, then SIGKILL of the source, then more writes once it is
    // back: the restarted source is the same replica set with the same oplog.
    for i in 0..50 {
        until_accepted("updating", || {
            docs.update_one(doc! {"_id": i}, doc! {"$set": {"v": 1}})
        })
        .await;
    }
    converged().await;
    let before = replica_set_id(&src).await;
    source.kill9();
    source.spawn();
    for i in 50..150 {
        until_accepted("updating after the restart", || {
            docs.update_one(doc! {"_id": i}, doc! {"$set": {"v": 2}})
        })
        .await;
    }
    until_accepted("inserting after the restart", || {
        docs.insert_one(doc! {"_id": 1000, "v": 3})
    })
    .await;
    converged().await;
    assert_eq!(replica_set_id(&src).await, before, "the same replica set");
    assert_eq!(
        d.namespace_state("rs.items").await.as_deref(),
        Some("streaming")
    );
    assert_no_recopy(&d);
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_step_downs_are_waited_out_without_a_recopy() {
    // The primary steps down every 1.5 s for 0.4 s: hello says so, writes are refused with
    // NotWritablePrimary and connections are closed, then it is primary again, higher term.
    let source = MongoSim::builder()
        .replica_set("src")
        .noop_interval(Duration::from_secs(1))
        .stepdown_every(Duration::from_millis(1500), Duration::from_millis(400))
        .start()
        .await
        .unwrap();
    let dest = MongoSim::builder()
        .replica_set("dst")
        .noop_interval(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let src = Client::with_uri_str(source.uri()).await.unwrap();
    let dst = Client::with_uri_str(dest.uri()).await.unwrap();
    let c = Clusters {
        source,
        dest,
        src,
        dst,
    };
    let docs = c.src.database("sd").collection::<Document>("items");
    until_accepted("seeding the source", || {
        docs.insert_many((0..200).map(|i| doc! {"_id": i, "v": 0}))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"sd.*\"]\n");
    wait_converged(&c, &[("sd", "items")], T).await;
    let first_term = term(&c.src).await;
    // Several step-downs while the source keeps taking writes.
    let started = std::time::Instant::now();
    let mut v = 0;
    while started.elapsed() < Duration::from_secs(6) {
        v += 1;
        let id = v % 200;
        until_accepted("updating across step-downs", || {
            docs.update_one(doc! {"_id": id}, doc! {"$set": {"v": v}})
        })
        .await;
    }
    wait_converged(&c, &[("sd", "items")], T).await;
    d.wait_streaming("sd.items").await;
    assert!(
        term(&c.src).await >= first_term + 2,
        "the source stepped down and was elected again at least twice"
    );
    assert_no_recopy(&d);
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

//! Conflict policies: scripted concurrent source and destination writes on the same documents,
//! with the final destination state and the conflict journal asserted exactly.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use futures::TryStreamExt;

use crate::support::cluster::{wait_until, Clusters, Daemon};

const NS: &str = "app.items";

struct Scenario {
    c: Clusters,
    d: Daemon,
    _dir: tempfile::TempDir,
}

fn date(secs: i64) -> Bson {
    Bson::DateTime(DateTime::from_millis(secs * 1000))
}

/// Seeds `app.items` (pre/post images enabled when `images`), starts the daemon with `extra`
/// config, and waits until it streams past its replay window, so conflicts are detected.
async fn start(extra: &str, images: bool) -> Scenario {
    start_with_collation(extra, images, None).await
}

/// As [`start`], with `app.items` created with `collation` on both clusters.
async fn start_with_collation(extra: &str, images: bool, collation: Option<Document>) -> Scenario {
    let c = Clusters::start().await;
    let app = c.src.database("app");
    let mut create = doc! {"create": "items"};
    if images {
        create.insert("changeStreamPreAndPostImages", doc! {"enabled": true});
    }
    if let Some(collation) = &collation {
        create.insert("collation", collation.clone());
        c.dst
            .database("app")
            .run_command(doc! {"create": "items", "collation": collation.clone()})
            .await
            .unwrap();
    }
    if create.len() > 1 {
        app.run_command(create).await.unwrap();
    }
    let items = app.collection::<Document>("items");
    items
        .insert_many(
            (1..=5)
                .map(|i| doc! {"_id": i, "v": 1, "updated_at": date(1000), "s": "orig"})
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &c,
        dir.path(),
        &format!("[sync]\nnamespaces = [\"app.*\"]\n\n{extra}"),
    );
    let cps = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("checkpoints");
    wait_until(
        "streaming past the replay window",
        Duration::from_secs(60),
        || async {
            match cps.find_one(doc! {"_id.ns": NS}).await.unwrap() {
                Some(cp) => match (
                    cp.get_timestamp("applied_through"),
                    cp.get_timestamp("replay_until"),
                ) {
                    (Ok(a), Ok(r)) => {
                        cp.get_str("phase").ok() == Some("streaming")
                            && (a.time, a.increment) > (r.time, r.increment)
                    }
                    _ => false,
                },
                None => false,
            }
        },
    )
    .await;
    Scenario { c, d, _dir: dir }
}

impl Scenario {
    fn src(&self) -> mongodb::Collection<Document> {
        self.c.src.database("app").collection("items")
    }

    fn dst(&self) -> mongodb::Collection<Document> {
        self.c.dst.database("app").collection("items")
    }

    /// Writes a sentinel on the source and waits for it: every earlier event was applied.
    async fn barrier(&self) {
        let id = format!("sentinel-{}", rand::random::<u32>());
        self.src()
            .insert_one(doc! {"_id": id.clone()})
            .await
            .unwrap();
        let dst = self.dst();
        wait_until("the sentinel arrives", Duration::from_secs(30), || async {
            dst.find_one(doc! {"_id": id.clone()})
                .await
                .unwrap()
                .is_some()
        })
        .await;
        // Deleted on the source only, and waited for: a sentinel deleted on the destination
        // first would make the source's delete a conflict of its own.
        self.src()
            .delete_many(doc! {"_id": {"$type": "string"}})
            .await
            .unwrap();
        wait_until(
            "the sentinel is deleted",
            Duration::from_secs(30),
            || async {
                dst.find_one(doc! {"_id": id.clone()})
                    .await
                    .unwrap()
                    .is_none()
            },
        )
        .await;
    }

    async fn dest_doc(&self, id: i32) -> Option<Document> {
        self.dst().find_one(doc! {"_id": id}).await.unwrap()
    }

    async fn journal(&self) -> Vec<Document> {
        self.c
            .dst
            .database("mongo_syncd")
            .collection::<Document>("conflicts")
            .find(doc! {})
            .sort(doc! {"doc_id": 1, "at": 1})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    async fn conflicts(&self, policy: &str, outcome: &str) -> f64 {
        let (_, body) = self.d.get("/metrics").await.unwrap();
        body.lines()
            .filter(|l| l.starts_with("mongo_syncd_conflicts_total{"))
            .filter(|l| {
                l.contains(&format!("policy=\"{policy}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }
}

/// The destination-wins script: the destination changed doc 1, lost doc 2 and gained doc 10;
/// the source then writes to all of them (and to untouched docs 3 and 4).
async fn destination_wins_script(s: &Scenario) {
    s.dst()
        .update_one(doc! {"_id": 1}, doc! {"$set": {"s": "dest-edit"}})
        .await
        .unwrap();
    s.dst().delete_one(doc! {"_id": 2}).await.unwrap();
    s.dst()
        .insert_one(doc! {"_id": 10, "s": "dest-only"})
        .await
        .unwrap();
    s.src()
        .update_one(doc! {"_id": 1}, doc! {"$set": {"s": "src-edit"}})
        .await
        .unwrap();
    s.src()
        .update_one(doc! {"_id": 2}, doc! {"$set": {"s": "src-edit"}})
        .await
        .unwrap();
    s.src()
        .update_one(doc! {"_id": 3}, doc! {"$set": {"s": "src-edit"}})
        .await
        .unwrap();
    s.src().delete_one(doc! {"_id": 4}).await.unwrap();
    s.src()
        .replace_one(doc! {"_id": 5}, doc! {"v": 2, "s": "replaced"})
        .await
        .unwrap();
    s.src()
        .insert_one(doc! {"_id": 10, "s": "src-insert"})
        .await
        .unwrap();
    s.barrier().await;
}

async fn assert_destination_kept_its_changes(s: &Scenario) {
    assert_eq!(
        s.dest_doc(1).await.unwrap().get_str("s").unwrap(),
        "dest-edit",
        "doc 1 keeps the destination's edit"
    );
    assert!(s.dest_doc(2).await.is_none(), "doc 2 is never recreated");
    assert_eq!(
        s.dest_doc(3).await.unwrap().get_str("s").unwrap(),
        "src-edit",
        "unconflicted doc 3 follows the source"
    );
    assert!(s.dest_doc(4).await.is_none(), "unconflicted delete applies");
    assert_eq!(
        s.dest_doc(5).await.unwrap(),
        doc! {"_id": 5, "v": 2, "s": "replaced"},
        "unconflicted replace applies"
    );
    assert_eq!(
        s.dest_doc(10).await.unwrap().get_str("s").unwrap(),
        "dest-only",
        "the destination's doc 10 is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_wins_skips_conflicting_writes_without_journal() {
    let mut s = start(
        "[conflict]\npolicy = \"destination-wins\"\njournal = false\n",
        true,
    )
    .await;
    destination_wins_script(&s).await;
    assert_destination_kept_its_changes(&s).await;
    assert!(
        s.journal().await.is_empty(),
        "journal = false records nothing"
    );
    assert_eq!(s.conflicts("destination-wins", "skipped").await, 3.0);
    assert_eq!(s.d.terminate().await, Some(0), "log:\n{}", s.d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_policy_records_every_skipped_write_with_both_versions() {
    let mut s = start("[conflict]\npolicy = \"journal\"\njournal = false\n", true).await;
    destination_wins_script(&s).await;
    assert_destination_kept_its_changes(&s).await;
    let journal = s.journal().await;
    let summary: Vec<(i32, String, String, Bson, Bson)> = journal
        .iter()
        .map(|j| {
            (
                j.get_i32("doc_id").unwrap(),
                j.get_str("op").unwrap().to_string(),
                j.get_str("outcome").unwrap().to_string(),
                j.get("source").cloned().unwrap(),
                j.get("destination").cloned().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                1,
                "update".into(),
                "journaled".into(),
                Bson::Document(doc! {"_id": 1, "v": 1, "updated_at": date(1000), "s": "src-edit"}),
                Bson::Document(doc! {"_id": 1, "v": 1, "updated_at": date(1000), "s": "dest-edit"}),
            ),
            (
                2,
                "update".into(),
                "journaled".into(),
                Bson::Document(doc! {"_id": 2, "v": 1, "updated_at": date(1000), "s": "src-edit"}),
                Bson::Null,
            ),
            (
                10,
                "insert".into(),
                "journaled".into(),
                Bson::Document(doc! {"_id": 10, "s": "src-insert"}),
                Bson::Document(doc! {"_id": 10, "s": "dest-only"}),
            ),
        ]
    );
    assert!(journal
        .iter()
        .all(|j| j.get_str("policy").unwrap() == "journal" && j.get_str("ns").unwrap() == NS));
    assert_eq!(s.conflicts("journal", "journaled").await, 3.0);
    assert_eq!(s.d.terminate().await, Some(0), "log:\n{}", s.d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_wins_keeps_the_newer_date() {
    let mut s = start(
        "[conflict]\npolicy = \"newest-wins\"\nfield = \"updated_at\"\n",
        false,
    )
    .await;
    // Destination edits: doc 1 newer than what the source will write, doc 2 older, doc 3 gone,
    // doc 10 exists only on the destination with a newer date.
    s.dst()
        .update_one(
            doc! {"_id": 1},
            doc! {"$set": {"s": "dest-newer", "updated_at": date(3000)}},
        )
        .await
        .unwrap();
    s.dst()
        .update_one(
            doc! {"_id": 2},
            doc! {"$set": {"s": "dest-older", "updated_at": date(1500)}},
        )
        .await
        .unwrap();
    s.dst().delete_one(doc! {"_id": 3}).await.unwrap();
    s.dst()
        .insert_one(doc! {"_id": 10, "s": "dest-only", "updated_at": date(5000)})
        .await
        .unwrap();
    for id in [1, 2, 3] {
        s.src()
            .update_one(
                doc! {"_id": id},
                doc! {"$set": {"s": "src", "updated_at": date(2000)}},
            )
            .await
            .unwrap();
    }
    // Equal dates apply (replays stay idempotent).
    s.src()
        .update_one(doc! {"_id": 5}, doc! {"$set": {"s": "src-same-date"}})
        .await
        .unwrap();
    s.src()
        .insert_one(doc! {"_id": 10, "s": "src-insert", "updated_at": date(4000)})
        .await
        .unwrap();
    s.src().delete_one(doc! {"_id": 4}).await.unwrap();
    s.barrier().await;
    assert_eq!(
        s.dest_doc(1).await.unwrap().get_str("s").unwrap(),
        "dest-newer"
    );
    assert_eq!(s.dest_doc(2).await.unwrap().get_str("s").unwrap(), "src");
    assert_eq!(
        s.dest_doc(3).await.unwrap().get_str("s").unwrap(),
        "src",
        "newest-wins recreates a missing document"
    );
    assert!(s.dest_doc(4).await.is_none(), "deletes always apply");
    assert_eq!(
        s.dest_doc(5).await.unwrap().get_str("s").unwrap(),
        "src-same-date"
    );
    assert_eq!(
        s.dest_doc(10).await.unwrap().get_str("s").unwrap(),
        "dest-only"
    );
    let journal = s.journal().await;
    let ids: Vec<(i32, String)> = journal
        .iter()
        .map(|j| {
            (
                j.get_i32("doc_id").unwrap(),
                j.get_str("outcome").unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        vec![(1, "journaled".to_string()), (10, "journaled".to_string())],
        "conflict.journal defaults to true"
    );
    assert_eq!(
        journal[0]
            .get_document("destination")
            .unwrap()
            .get_str("s")
            .unwrap(),
        "dest-newer"
    );
    assert_eq!(
        journal[0]
            .get_document("source")
            .unwrap()
            .get_str("s")
            .unwrap(),
        "src"
    );
    assert_eq!(s.conflicts("newest-wins", "journaled").await, 2.0);
    assert_eq!(s.d.terminate().await, Some(0), "log:\n{}", s.d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_wins_keeps_the_higher_version_per_rule() {
    let mut s = start(
        "[conflict]\npolicy = \"source-wins\"\njournal = false\n\n[[conflict.rules]]\nnamespaces = [\"app.items\"]\npolicy = \"version-wins\"\nfield = \"v\"\n",
        false,
    )
    .await;
    s.dst()
        .update_one(doc! {"_id": 1}, doc! {"$set": {"s": "dest-v9", "v": 9}})
        .await
        .unwrap();
    s.dst()
        .update_one(doc! {"_id": 2}, doc! {"$set": {"s": "dest-v2", "v": 2}})
        .await
        .unwrap();
    s.dst()
        .update_one(doc! {"_id": 3}, doc! {"$set": {"v": "not a number"}})
        .await
        .unwrap();
    for id in [1, 2, 3] {
        s.src()
            .update_one(doc! {"_id": id}, doc! {"$set": {"s": "src-v5", "v": 5}})
            .await
            .unwrap();
    }
    s.barrier().await;
    assert_eq!(
        s.dest_doc(1).await.unwrap().get_str("s").unwrap(),
        "dest-v9",
        "higher destination version wins"
    );
    assert_eq!(
        s.dest_doc(2).await.unwrap().get_str("s").unwrap(),
        "src-v5",
        "higher source version wins"
    );
    assert_eq!(
        s.dest_doc(3).await.unwrap().get_str("v").unwrap(),
        "not a number",
        "a field of another type on the destination is a conflict: skipped"
    );
    assert!(s.journal().await.is_empty());
    assert_eq!(s.conflicts("version-wins", "skipped").await, 2.0);
    assert_eq!(s.d.terminate().await, Some(0), "log:\n{}", s.d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_wins_without_pre_images_is_refused_or_enabled() {
    // Without pre-images and without permission to enable them: exit 78 with instructions.
    let c = Clusters::start().await;
    c.src
        .database("app")
        .collection::<Document>("items")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"app.*\"]\n\n[conflict]\npolicy = \"destination-wins\"\n",
    );
    assert_eq!(
        d.wait_exit(Duration::from_secs(60)).await,
        Some(78),
        "log:\n{}",
        d.logs()
    );
    assert!(
        d.logs()
            .contains("changeStreamPreAndPostImages: {enabled: true}"),
        "log:\n{}",
        d.logs()
    );
    assert!(d.logs().contains("conflict.enable_pre_images = true"));
    drop(d);

    // With conflict.enable_pre_images the daemon turns them on itself.
    let mut s = start(
        "[conflict]\npolicy = \"destination-wins\"\nenable_pre_images = true\n",
        false,
    )
    .await;
    let opts: Vec<Document> =
        s.c.src
            .database("app")
            .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": "items"}})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
    assert_eq!(
        opts[0]
            .get_document("options")
            .unwrap()
            .get_document("changeStreamPreAndPostImages")
            .unwrap(),
        &doc! {"enabled": true}
    );
    destination_wins_script(&s).await;
    assert_destination_kept_its_changes(&s).await;
    assert_eq!(s.d.terminate().await, Some(0), "log:\n{}", s.d.logs());
}

/// Issue 10: destination-wins equality is exact under a case-insensitive collation. Source and
/// destination collections are both `{locale: "en", strength: 2}`; the destination changed
/// `s: "Bob"` to `"bob"`, equal under that collation but a different document: the source's next
/// write to it is a conflict and the destination keeps `"bob"`. The daemon decides on the
/// destination document's bytes, so the collation of its `$expr` guard cannot blur the two.
/// And the source itself cannot hold both `_id: "Bob"` and `_id: "bob"` (E11000, as MongoDB's
/// `_id` index keys strings by collation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_wins_equality_is_exact_under_a_case_insensitive_collation() {
    let mut s = start_with_collation(
        "[conflict]\npolicy = \"destination-wins\"\njournal = false\n",
        true,
        Some(doc! {"locale": "en", "strength": 2}),
    )
    .await;
    for id in [1, 2] {
        s.src()
            .update_one(doc! {"_id": id}, doc! {"$set": {"s": "Bob"}})
            .await
            .unwrap();
    }
    s.barrier().await;
    assert_eq!(s.dest_doc(1).await.unwrap().get_str("s").unwrap(), "Bob");
    // The destination's edit: equal under the collation, not the same document.
    s.dst()
        .update_one(doc! {"_id": 1}, doc! {"$set": {"s": "bob"}})
        .await
        .unwrap();
    for id in [1, 2] {
        s.src()
            .update_one(doc! {"_id": id}, doc! {"$set": {"v": 2}})
            .await
            .unwrap();
    }
    s.barrier().await;
    let one = s.dest_doc(1).await.unwrap();
    assert_eq!(
        one.get_str("s").unwrap(),
        "bob",
        "the destination keeps its edit: {one}"
    );
    assert_eq!(
        one.get_i32("v").unwrap(),
        1,
        "the source's write was skipped: {one}"
    );
    let two = s.dest_doc(2).await.unwrap();
    assert_eq!(
        (two.get_str("s").unwrap(), two.get_i32("v").unwrap()),
        ("Bob", 2),
        "the unconflicted document follows the source: {two}"
    );
    assert_eq!(
        s.conflicts("destination-wins", "skipped").await,
        1.0,
        "log:\n{}",
        s.d.logs()
    );

    // `_id` under the collection's collation: "bob" is the same `_id` as "Bob".
    s.src().insert_one(doc! {"_id": "Bob"}).await.unwrap();
    let e = s.src().insert_one(doc! {"_id": "bob"}).await.unwrap_err();
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => {
            assert_eq!(w.code, 11000, "{e}");
            assert!(w.message.starts_with("E11000 duplicate key error"), "{e}");
        }
        _ => panic!("expected a duplicate key write error, got {e}"),
    }
    assert_eq!(
        s.src()
            .count_documents(doc! {"_id": {"$type": "string"}})
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.d.terminate().await, Some(0), "log:\n{}", s.d.logs());
}

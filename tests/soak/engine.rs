//! The randomized differential soak (issue 9): a seeded, model-based generator of source
//! operations, faults chosen by the same seed, and an oracle run after quiescence.
//!
//! Shared by the integration test `soak::soak_seeds` (tests/soak/mod.rs) and the long-run driver
//! `cargo run --release --example soak` (examples/soak.rs), which includes this file by `#[path]`.
//! It depends only on the simulator and on crates both targets have, never on the test helpers.
//!
//! A *round* is one pair of in-process simulators and one `mongo-syncd` process; it runs
//! `per_round` consecutive seeds at once, each in its own source database `soak_<seed>` (the
//! operations of a seed depend only on that seed). The round's fault schedule is drawn from its
//! first seed. A failure prints the seed, the fault schedule, the operation log of the seed and
//! the command that re-runs the round.

#![allow(dead_code)]

// The example `soak` builds this engine without the test support modules, so it loads the files
// itself; in the test binary they are also `support::isolated` and `support::ports`.
#[allow(clippy::duplicate_mod)]
#[path = "../support/isolated.rs"]
mod isolated;
#[allow(clippy::duplicate_mod)]
#[path = "../support/ports.rs"]
mod ports;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bson::{doc, oid::ObjectId, Bson, Decimal128, Document, RawDocumentBuf, Timestamp};
use futures::TryStreamExt;
use mongo_sim::{MongoSim, SimHandle};
use mongodb::{options::ReturnDocument, Client};
use parking_lot::Mutex;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Operation kinds of the generator (switch them with `SOAK_OPS` / `--ops`).
pub const OP_KINDS: &[&str] = &[
    "insert",
    "set",
    "unset",
    "inc",
    "push",
    "pull",
    "rename",
    "arrayindex",
    "truncate",
    "pipeline",
    "replace",
    "delete",
    "fam",
    "txn",
    "weird",
    "unique",
    "create",
    "drop",
    "recreate",
    "renamecoll",
    "dropdb",
    "index",
    "validator",
    "burst",
    // Not an operation: `_id`s 2^53, 2^53 + 1, 2^53 + 2, i64::MAX - 1 and i64::MAX in the pool.
    "bigid",
];

/// Fault kinds (switch them with `SOAK_FAULTS` / `--faults`).
pub const FAULT_KINDS: &[&str] = &[
    "kill",
    "kill_copy",
    "kill_checkpoint",
    "stop_across",
    "failcmd",
    "block",
    "src_close",
    "history_loss",
    // Rounds with any of these run two instances with `ha.enabled` (DESIGN §2.12).
    "ha_kill",
    "ha_pause",
    "ha_handover",
];

/// A set of enabled kinds, parsed from `all`, `none`, `a,b,c` or `-a,-b` (all but these).
#[derive(Debug, Clone)]
pub struct Kinds(pub BTreeSet<&'static str>);

impl Kinds {
    pub fn parse(spec: &str, all: &[&'static str]) -> Result<Kinds, String> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "all" {
            return Ok(Kinds(all.iter().copied().collect()));
        }
        if spec == "none" {
            return Ok(Kinds(BTreeSet::new()));
        }
        let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
        let negative = parts.iter().all(|p| p.starts_with('-'));
        let mut set: BTreeSet<&'static str> = if negative {
            all.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        for p in parts {
            let name = p.trim_start_matches('-');
            let known = all
                .iter()
                .copied()
                .find(|k| *k == name)
                .ok_or_else(|| format!("unknown kind {name:?}; known: {}", all.join(",")))?;
            if negative {
                set.remove(known);
            } else {
                set.insert(known);
            }
        }
        Ok(Kinds(set))
    }

    pub fn has(&self, k: &str) -> bool {
        self.0.contains(k)
    }

    pub fn spec(&self) -> String {
        self.0.iter().copied().collect::<Vec<_>>().join(",")
    }
}

/// Everything a soak run needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `mongo-syncd` binary to run (reused, never rebuilt).
    pub daemon_bin: PathBuf,
    pub first_seed: u64,
    pub seeds: u64,
    /// Seeds per round (one daemon, one database per seed).
    pub per_round: u64,
    /// Rounds run at the same time.
    pub parallel: usize,
    /// Source operations per seed.
    pub ops_per_seed: usize,
    pub ops: Kinds,
    pub faults: Kinds,
    /// Bound of the wait for quiescence, per round.
    pub quiesce_timeout: Duration,
    /// Print every round's summary.
    pub verbose: bool,
    /// `source.stream_scope` of every round, or `rotate`: collection, deployment, database,
    /// auto and atomic in turn, by round. `atomic` is `auto` with `apply.transactions =
    /// "atomic"`.
    pub stream_scope: String,
    /// `apply.batch_max_events` of every round, or 0: 1000, 4 and 32 in turn, by round. Small
    /// batches put several batches of one namespace in a backlog, so one is prepared while the
    /// one before is written (issue 11 item 4).
    pub batch_events: u64,
}

/// The scopes `rotate` goes through.
pub const STREAM_SCOPES: [&str; 5] = ["collection", "deployment", "database", "auto", "atomic"];

/// The `apply.batch_max_events` rounds go through (1000: the default).
pub const BATCH_EVENTS: [u64; 3] = [1000, 4, 32];

impl Options {
    /// Defaults overridden by `SOAK_*` environment variables; `default_ops` and
    /// `default_faults` apply when `SOAK_OPS` / `SOAK_FAULTS` are not set ("" = all kinds).
    pub fn from_env(
        daemon_bin: PathBuf,
        default_seeds: u64,
        default_ops: &str,
        default_faults: &str,
    ) -> Result<Options, String> {
        let num = |name: &str, default: u64| -> Result<u64, String> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("{name}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        };
        Ok(Options {
            daemon_bin,
            first_seed: num("SOAK_SEED", 1)?,
            seeds: num("SOAK_SEEDS", default_seeds)?,
            per_round: num("SOAK_PER_ROUND", 50)?.max(1),
            parallel: num("SOAK_PARALLEL", 1)?.max(1) as usize,
            ops_per_seed: num("SOAK_OPS_PER_SEED", 24)? as usize,
            ops: Kinds::parse(
                &std::env::var("SOAK_OPS").unwrap_or_else(|_| default_ops.to_string()),
                OP_KINDS,
            )?,
            faults: Kinds::parse(
                &std::env::var("SOAK_FAULTS").unwrap_or_else(|_| default_faults.to_string()),
                FAULT_KINDS,
            )?,
            quiesce_timeout: Duration::from_secs(num("SOAK_QUIESCE_SECONDS", 90)?),
            verbose: std::env::var("SOAK_VERBOSE").is_ok_and(|v| v != "0"),
            stream_scope: std::env::var("SOAK_STREAM_SCOPE").unwrap_or_else(|_| "rotate".into()),
            batch_events: num("SOAK_BATCH_EVENTS", 0)?,
        })
    }

    /// `apply.batch_max_events` of the round starting at `first`.
    pub fn batch_events_of(&self, first: u64) -> u64 {
        if self.batch_events == 0 {
            let round = (first.saturating_sub(1) / self.per_round) as usize;
            BATCH_EVENTS[round % BATCH_EVENTS.len()]
        } else {
            self.batch_events
        }
    }

    /// The stream scope of the round starting at `first`.
    pub fn scope_of(&self, first: u64) -> &str {
        if self.stream_scope == "rotate" {
            let round = (first.saturating_sub(1) / self.per_round) as usize;
            STREAM_SCOPES[round % STREAM_SCOPES.len()]
        } else {
            &self.stream_scope
        }
    }

    /// The command that re-runs the round starting at `first`.
    pub fn rerun_command(&self, first: u64, count: u64) -> String {
        let scope = self.scope_of(first);
        let batch = self.batch_events_of(first);
        format!(
            "SOAK_SEED={first} SOAK_SEEDS={count} SOAK_PER_ROUND={count} SOAK_OPS_PER_SEED={} SOAK_OPS={} SOAK_FAULTS={} SOAK_STREAM_SCOPE={scope} SOAK_BATCH_EVENTS={batch} cargo test --test main soak::soak_seeds -- --nocapture\n  \
             or: cargo run --release --example soak -- --seed {first} --seeds {count} --per-round {count} --ops-per-seed {} --ops {} --faults {} --stream-scope {scope} --batch-events {batch}",
            self.ops_per_seed,
            or_none(&self.ops.spec()),
            or_none(&self.faults.spec()),
            self.ops_per_seed,
            or_none(&self.ops.spec()),
            or_none(&self.faults.spec()),
        )
    }
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "none".into()
    } else {
        s.into()
    }
}

// ---------------------------------------------------------------------------------------------
// `_id` pool: equal values share a class (MongoDB's `_id` index treats them as one key).

/// `(class, value)`: values of one class are equal for MongoDB, values of different classes are not.
fn id_pool() -> Vec<(usize, Bson)> {
    let big = 1i64 << 53;
    let dec = |s: &str| Bson::Decimal128(s.parse::<Decimal128>().expect("decimal literal"));
    let oid = |n: u8| {
        Bson::ObjectId(ObjectId::from_bytes([
            0x65, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n,
        ]))
    };
    vec![
        (0, Bson::Int32(7)),
        (0, Bson::Int64(7)),
        (0, Bson::Double(7.0)),
        (1, Bson::Int64(big)),
        (2, Bson::Int64(big + 1)),
        (3, Bson::Int64(big + 2)),
        (4, Bson::Int64(i64::MAX)),
        (5, Bson::Int64(i64::MAX - 1)),
        (6, dec("1.5")),
        (7, Bson::Int32(2)),
        (7, dec("2")),
        (7, dec("2.00")),
        (8, Bson::String("a".into())),
        (9, Bson::String("A".into())),
        (10, oid(1)),
        (11, oid(2)),
        (12, Bson::Document(doc! {"k": 1, "j": 2})),
        (13, Bson::Document(doc! {"j": 2, "k": 1})),
        (14, Bson::Document(doc! {"k": 3i64})),
        (14, Bson::Document(doc! {"k": 3})),
        (15, Bson::Double(0.5)),
    ]
}

fn id_class(pool: &[(usize, Bson)], id: &Bson) -> Option<usize> {
    pool.iter().find(|(_, v)| v == id).map(|(c, _)| *c)
}

// ---------------------------------------------------------------------------------------------
// The model of one scenario's source database.

const COLL_NAMES: &[&str] = &["a", "b", "c"];

#[derive(Debug, Clone, Default)]
struct CollModel {
    /// class → (the `_id` as stored, email)
    docs: BTreeMap<usize, (Bson, String)>,
}

/// One seed: its own database, generator and log.
pub struct Scenario {
    pub seed: u64,
    pub db: String,
    rng: StdRng,
    pool: Vec<(usize, Bson)>,
    colls: BTreeMap<String, CollModel>,
    next_email: u64,
    /// Collections that saw a pipeline or `$setField` update (field order may legitimately differ).
    pub reordered: BTreeSet<String>,
    pub log: Vec<String>,
    pub kinds_used: BTreeMap<&'static str, u64>,
    pub source_errors: u64,
}

fn fresh_doc(rng: &mut StdRng, id: Bson, email: &str) -> Document {
    let arr: Vec<Bson> = (0..rng.random_range(0..4))
        .map(|_| Bson::Int32(rng.random_range(0..5)))
        .collect();
    let mut d = doc! {"_id": id, "email": email, "n": rng.random_range(0..100), "f": format!("v{}", rng.random_range(0..9)), "arr": arr, "sub": {"x": rng.random_range(0..9), "y": "s"}};
    if rng.random_bool(0.2) {
        d.insert("big", Bson::Int64((1i64 << 53) + rng.random_range(0..3)));
    }
    d
}

impl Scenario {
    pub fn new(seed: u64, kinds: &Kinds) -> Scenario {
        let mut pool = id_pool();
        if !kinds.has("bigid") {
            pool.retain(|(_, v)| !matches!(v, Bson::Int64(n) if n.unsigned_abs() >= 1 << 53));
        }
        Scenario {
            seed,
            db: format!("soak_{seed}"),
            rng: StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x50A_C0DE),
            pool,
            colls: BTreeMap::new(),
            next_email: 0,
            reordered: BTreeSet::new(),
            log: Vec::new(),
            kinds_used: BTreeMap::new(),
            source_errors: 0,
        }
    }

    fn email(&mut self) -> String {
        self.next_email += 1;
        format!("e{}", self.next_email)
    }

    /// Reads the collections of the database back into the model (after every operation: the
    /// model is always the source's truth, whatever an operation did or failed to do).
    async fn refresh(&mut self, src: &Client) {
        let db = src.database(&self.db);
        let names = db.list_collection_names().await.unwrap_or_default();
        self.colls.clear();
        for name in names.into_iter().filter(|n| !n.starts_with("system.")) {
            let docs: Vec<Document> = match db.collection::<Document>(&name).find(doc! {}).await {
                Ok(c) => c.try_collect().await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let mut m = CollModel::default();
            for d in docs {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                let Some(class) = id_class(&self.pool, &id) else {
                    continue;
                };
                let email = d.get_str("email").unwrap_or("").to_string();
                m.docs.insert(class, (id, email));
            }
            self.colls.insert(name, m);
        }
    }

    /// Creates the seed's starting state: collections `a` (unique index on `email`) and `b`.
    pub async fn setup(&mut self, src: &Client) {
        let db = src.database(&self.db);
        for name in ["a", "b"] {
            let mut docs = Vec::new();
            let mut used = BTreeSet::new();
            for _ in 0..self.rng.random_range(2..6) {
                let (class, id) = self.pool[self.rng.random_range(0..self.pool.len())].clone();
                if used.insert(class) {
                    let e = self.email();
                    docs.push(fresh_doc(&mut self.rng, id, &e));
                }
            }
            db.create_collection(name).await.expect("create");
            if name == "a" {
                db.run_command(doc! {"createIndexes": name, "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]})
                    .await
                    .expect("unique index");
            }
            self.log.push(format!("setup {name}: {} docs", docs.len()));
            db.collection::<Document>(name)
                .insert_many(docs)
                .await
                .expect("seed documents");
        }
        self.refresh(src).await;
    }

    fn existing(&self) -> Vec<String> {
        self.colls.keys().cloned().collect()
    }

    fn pick_coll(&mut self) -> Option<String> {
        let names = self.existing();
        (!names.is_empty()).then(|| names[self.rng.random_range(0..names.len())].clone())
    }

    /// An `_id` in any representation: of an existing document with probability 3/4.
    fn pick_id(&mut self, coll: &str) -> Bson {
        let existing: Vec<usize> = self
            .colls
            .get(coll)
            .map(|m| m.docs.keys().copied().collect())
            .unwrap_or_default();
        let class = if !existing.is_empty() && self.rng.random_bool(0.75) {
            existing[self.rng.random_range(0..existing.len())]
        } else {
            self.pool[self.rng.random_range(0..self.pool.len())].0
        };
        let reprs: Vec<Bson> = self
            .pool
            .iter()
            .filter(|(c, _)| *c == class)
            .map(|(_, v)| v.clone())
            .collect();
        reprs[self.rng.random_range(0..reprs.len())].clone()
    }

    fn free_id(&mut self, coll: &str) -> Option<Bson> {
        let free: Vec<Bson> = self
            .pool
            .iter()
            .filter(|(c, _)| !self.colls.get(coll).is_some_and(|m| m.docs.contains_key(c)))
            .map(|(_, v)| v.clone())
            .collect();
        (!free.is_empty()).then(|| free[self.rng.random_range(0..free.len())].clone())
    }

    fn doc_of(&mut self, coll: &str) -> Option<(Bson, String)> {
        let docs: Vec<(Bson, String)> = self
            .colls
            .get(coll)
            .map(|m| m.docs.values().cloned().collect())
            .unwrap_or_default();
        (!docs.is_empty()).then(|| docs[self.rng.random_range(0..docs.len())].clone())
    }

    fn record(&mut self, kind: &'static str, what: String, result: Result<String, String>) {
        *self.kinds_used.entry(kind).or_default() += 1;
        match result {
            Ok(r) => self.log.push(format!("{kind}: {what} -> {r}")),
            Err(e) => {
                self.source_errors += 1;
                self.log
                    .push(format!("{kind}: {what} -> source error: {e}"));
            }
        }
    }

    /// Issues one operation of a kind drawn from `kinds`, then refreshes the model.
    pub async fn step(&mut self, src: &Client, kinds: &Kinds) {
        let enabled: Vec<&'static str> = OP_KINDS
            .iter()
            .copied()
            .filter(|k| kinds.has(k) && *k != "bigid")
            .collect();
        if enabled.is_empty() {
            return;
        }
        // Weights: data operations dominate, DDL is rarer.
        let weight = |k: &str| match k {
            "create" | "drop" | "recreate" | "renamecoll" | "index" | "validator" => 2,
            "dropdb" => 1,
            "unique" | "txn" | "fam" => 5,
            _ => 8,
        };
        let total: u32 = enabled.iter().map(|k| weight(k)).sum();
        let mut roll = self.rng.random_range(0..total);
        let mut kind = enabled[0];
        for k in &enabled {
            if roll < weight(k) {
                kind = k;
                break;
            }
            roll -= weight(k);
        }
        let Some(coll) = self.pick_coll() else {
            // Nothing exists (after a dropDatabase): re-create `a`.
            let r = src.database(&self.db).create_collection("a").await;
            self.record(
                "create",
                "create a (empty database)".into(),
                fmt(r.map(|_| "ok".to_string())),
            );
            self.refresh(src).await;
            return;
        };
        self.issue(src, kind, &coll).await;
        // Field updates change neither `_id`s nor emails nor collections: the model stays valid.
        let model_unchanged = matches!(
            kind,
            "set"
                | "unset"
                | "inc"
                | "push"
                | "pull"
                | "rename"
                | "arrayindex"
                | "truncate"
                | "pipeline"
                | "burst"
        );
        if !model_unchanged {
            self.refresh(src).await;
        }
    }

    async fn issue(&mut self, src: &Client, kind: &'static str, coll: &str) {
        let db = src.database(&self.db);
        let c = db.collection::<Document>(coll);
        let ns = coll.to_string();
        match kind {
            "insert" => {
                let Some(id) = self.free_id(coll) else { return };
                let e = self.email();
                let d = fresh_doc(&mut self.rng, id, &e);
                let what = format!("{ns}.insertOne({d})");
                let r = c.insert_one(d).await.map(|_| "ok".to_string());
                self.record(kind, what, fmt(r));
            }
            "set" | "unset" | "inc" | "push" | "pull" | "rename" | "arrayindex" | "truncate" => {
                let id = self.pick_id(coll);
                let v = self.rng.random_range(0..5);
                let u = match kind {
                    "set" => match self.rng.random_range(0..3) {
                        0 => doc! {"$set": {"n": v, "sub.x": v}},
                        1 => doc! {"$set": {"sub": {"y": "t", "x": v}}},
                        _ => doc! {"$set": {"f": format!("w{v}"), "new": {"deep": {"er": v}}}},
                    },
                    "unset" => match self.rng.random_range(0..3) {
                        0 => doc! {"$unset": {"f": ""}},
                        1 => doc! {"$unset": {"sub.x": ""}},
                        _ => doc! {"$unset": {"arr": "", "big": ""}},
                    },
                    "inc" => match self.rng.random_range(0..3) {
                        0 => doc! {"$inc": {"n": 1}},
                        1 => doc! {"$inc": {"n": Bson::Int64(1 << 40)}},
                        _ => doc! {"$inc": {"sub.x": -1, "cnt": 1}},
                    },
                    "push" => match self.rng.random_range(0..2) {
                        0 => doc! {"$push": {"arr": v}},
                        _ => doc! {"$push": {"arr": {"$each": [v, v + 1], "$position": 0}}},
                    },
                    "pull" => doc! {"$pull": {"arr": v}},
                    "rename" => match self.rng.random_range(0..3) {
                        0 => doc! {"$rename": {"f": "g"}},
                        1 => doc! {"$rename": {"g": "f"}},
                        _ => doc! {"$rename": {"sub.x": "sx"}},
                    },
                    "arrayindex" => match self.rng.random_range(0..3) {
                        0 => doc! {"$set": {"arr.0": v}},
                        1 => doc! {"$set": {"arr.5": v}},
                        _ => doc! {"$set": {"arr.1": {"o": v}}},
                    },
                    _ => match self.rng.random_range(0..3) {
                        0 => doc! {"$pop": {"arr": 1}},
                        1 => doc! {"$push": {"arr": {"$each": [], "$slice": 1}}},
                        _ => doc! {"$pop": {"arr": -1}},
                    },
                };
                let what = format!("{ns}.updateOne({{_id: {id}}}, {u})");
                let r = c
                    .update_one(doc! {"_id": id}, u)
                    .await
                    .map(|r| format!("matched {}", r.matched_count));
                self.record(kind, what, fmt(r));
            }
            "pipeline" => {
                let id = self.pick_id(coll);
                let p = match self.rng.random_range(0..3) {
                    0 => vec![
                        doc! {"$set": {"p": {"$add": [{"$ifNull": ["$n", 0]}, 1]}}},
                        doc! {"$unset": ["f"]},
                    ],
                    1 => vec![
                        doc! {"$set": {"n": {"$multiply": [{"$ifNull": ["$n", 1]}, 2]}, "moved": "$sub"}},
                    ],
                    _ => vec![doc! {"$replaceWith": {"$mergeObjects": [{"z": 1}, "$$ROOT"]}}],
                };
                self.reordered.insert(coll.to_string());
                let what = format!("{ns}.updateOne({{_id: {id}}}, pipeline {p:?})");
                let r = c
                    .update_one(doc! {"_id": id}, p)
                    .await
                    .map(|r| format!("matched {}", r.matched_count));
                self.record(kind, what, fmt(r));
            }
            "replace" => {
                let Some((id, email)) = self.doc_of(coll) else {
                    return;
                };
                // Another representation of the same key, kept email (unique index stays valid).
                let class = id_class(&self.pool, &id).unwrap_or(0);
                let reprs: Vec<Bson> = self
                    .pool
                    .iter()
                    .filter(|(c, _)| *c == class)
                    .map(|(_, v)| v.clone())
                    .collect();
                let filter_id = reprs[self.rng.random_range(0..reprs.len())].clone();
                let mut d = fresh_doc(&mut self.rng, id, &email);
                d.remove("_id");
                if self.rng.random_bool(0.5) {
                    d.insert("replaced", true);
                }
                let what = format!("{ns}.replaceOne({{_id: {filter_id}}}, {d})");
                let r = c
                    .replace_one(doc! {"_id": filter_id}, d)
                    .await
                    .map(|r| format!("matched {}", r.matched_count));
                self.record(kind, what, fmt(r));
            }
            "burst" => {
                // Every document of the collection changes two or three times at once, then a
                // few of them once more: a backlog of several batches of one namespace, so the
                // daemon prepares a batch while the one before it is written (issue 11 item 4).
                for round in 0..self.rng.random_range(2..4) {
                    let what = format!("{ns}.updateMany({{}}, {{$inc: {{burst: 1}}}}) #{round}");
                    let r = c
                        .update_many(doc! {}, doc! {"$inc": {"burst": 1}})
                        .await
                        .map(|r| format!("modified {}", r.modified_count));
                    self.record(kind, what, fmt(r));
                }
                for _ in 0..self.rng.random_range(1..4) {
                    let id = self.pick_id(coll);
                    let v = self.rng.random_range(0..5);
                    let what = format!("{ns}.updateOne({{_id: {id}}}, {{$set: {{burst: {v}}}}})");
                    let r = c
                        .update_one(doc! {"_id": id}, doc! {"$set": {"burst": v}})
                        .await
                        .map(|r| format!("matched {}", r.matched_count));
                    self.record(kind, what, fmt(r));
                }
            }
            "delete" => {
                let id = self.pick_id(coll);
                let what = format!("{ns}.deleteOne({{_id: {id}}})");
                let r = c
                    .delete_one(doc! {"_id": id})
                    .await
                    .map(|r| format!("deleted {}", r.deleted_count));
                self.record(kind, what, fmt(r));
            }
            "fam" => {
                let id = self.pick_id(coll);
                match self.rng.random_range(0..3) {
                    0 => {
                        let e = self.email();
                        let what = format!("{ns}.findOneAndUpdate({{_id: {id}}}, $inc n, $setOnInsert email {e}, upsert)");
                        let r = c
                            .find_one_and_update(
                                doc! {"_id": id},
                                doc! {"$inc": {"n": 1}, "$setOnInsert": {"email": e, "arr": [1]}},
                            )
                            .upsert(true)
                            .return_document(ReturnDocument::After)
                            .await
                            .map(|d| format!("{}", d.is_some()));
                        self.record(kind, what, fmt(r));
                    }
                    1 => {
                        let what = format!("{ns}.findOneAndDelete({{_id: {id}}})");
                        let r = c
                            .find_one_and_delete(doc! {"_id": id})
                            .await
                            .map(|d| format!("{}", d.is_some()));
                        self.record(kind, what, fmt(r));
                    }
                    _ => {
                        let class = id_class(&self.pool, &id).unwrap_or(0);
                        let email = match self.colls.get(coll).and_then(|m| m.docs.get(&class)) {
                            Some((_, e)) => e.clone(),
                            None => return,
                        };
                        let what = format!(
                            "{ns}.findOneAndReplace({{_id: {id}}}, {{email: {email}, fam: true}})"
                        );
                        let r = c
                            .find_one_and_replace(
                                doc! {"_id": id},
                                doc! {"email": email, "fam": true, "n": 1},
                            )
                            .await
                            .map(|d| format!("{}", d.is_some()));
                        self.record(kind, what, fmt(r));
                    }
                }
            }
            "txn" => {
                let names = self.existing();
                let other = names[self.rng.random_range(0..names.len())].clone();
                let ins = self.free_id(coll);
                let upd = self.pick_id(&other);
                let del = self.pick_id(coll);
                let e = self.email();
                let commit = self.rng.random_bool(0.85);
                let d = ins.map(|id| fresh_doc(&mut self.rng, id, &e));
                let what = format!(
                    "txn[{}]: {ns}.insert({}) ; {other}.update({upd}, $set txn) ; {ns}.delete({del})",
                    if commit { "commit" } else { "abort" },
                    d.as_ref().map(|d| d.to_string()).unwrap_or_default()
                );
                let (c, other_c, src) = (c.clone(), db.collection::<Document>(&other), src.clone());
                let r = async move {
                    let mut s = src.start_session().await?;
                    s.start_transaction().await?;
                    if let Some(d) = d {
                        c.insert_one(d).session(&mut s).await?;
                    }
                    other_c
                        .update_one(
                            doc! {"_id": upd},
                            doc! {"$set": {"txn": true}, "$inc": {"n": 1}},
                        )
                        .session(&mut s)
                        .await?;
                    c.delete_one(doc! {"_id": del}).session(&mut s).await?;
                    if commit {
                        s.commit_transaction().await?;
                    } else {
                        s.abort_transaction().await?;
                    }
                    Ok::<String, mongodb::error::Error>("ok".to_string())
                }
                .await;
                self.record(kind, what, fmt(r));
            }
            "weird" => {
                let Some(id) = self.free_id(coll) else { return };
                let e = self.email();
                let d = match self.rng.random_range(0..3) {
                    0 => doc! {"_id": id, "email": e, "a.b": 1, "n": 1},
                    1 => doc! {"_id": id, "email": e, "o": {"$d": 1, "x.y": 2}, "n": 2},
                    _ => doc! {"_id": id, "email": e, "0": "digit", "arr": [{"a.b": 1}]},
                };
                let what = format!("{ns}.insertOne({d})");
                let r = c.insert_one(d).await.map(|_| "ok".to_string());
                self.record(kind, what, fmt(r));
                // Then a literal dotted-field update through a pipeline ($setField).
                if self.rng.random_bool(0.5) {
                    let id = self.pick_id(coll);
                    self.reordered.insert(coll.to_string());
                    let p = vec![
                        doc! {"$replaceWith": {"$setField": {"field": "a.b", "input": "$$ROOT", "value": {"$literal": 9}}}},
                    ];
                    let what = format!("{ns}.updateOne({{_id: {id}}}, $setField 'a.b')");
                    let r = c
                        .update_one(doc! {"_id": id}, p)
                        .await
                        .map(|r| format!("matched {}", r.matched_count));
                    self.record(kind, what, fmt(r));
                }
            }
            "unique" => self.unique_dance(src, coll).await,
            "create" => {
                let Some(name) = COLL_NAMES.iter().find(|n| !self.colls.contains_key(**n)) else {
                    return;
                };
                let mut cmd = doc! {"create": *name};
                match self.rng.random_range(0..3) {
                    0 => {}
                    1 => {
                        cmd.insert("validator", doc! {"n": {"$type": "number"}});
                        cmd.insert("validationLevel", "moderate");
                    }
                    _ => {
                        // Only the simple collation: mongo-sim refuses ICU collations in reads
                        // (code 115) until it implements them (issue 10, item 3).
                        cmd.insert("collation", doc! {"locale": "simple"});
                    }
                }
                let what = format!("{cmd}");
                let r = db.run_command(cmd).await.map(|_| "ok".to_string());
                self.record(kind, what, fmt(r));
            }
            "drop" => {
                let what = format!("drop {ns}");
                let r = c.drop().await.map(|_| "ok".to_string());
                self.record(kind, what, fmt(r));
            }
            "recreate" => {
                let r = c.drop().await;
                self.record(
                    kind,
                    format!("drop {ns} (re-create follows)"),
                    fmt(r.map(|_| "ok".into())),
                );
                let mut cmd = doc! {"create": coll};
                if self.rng.random_bool(0.5) {
                    cmd.insert("validator", doc! {"n": {"$gte": 0}});
                } else {
                    cmd.insert("collation", doc! {"locale": "simple"});
                }
                let r = db.run_command(cmd.clone()).await.map(|_| "ok".to_string());
                self.record(kind, format!("{cmd}"), fmt(r));
                if self.rng.random_bool(0.5) {
                    let r = db
                        .run_command(doc! {"createIndexes": coll, "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]})
                        .await
                        .map(|_| "ok".to_string());
                    self.record(kind, format!("{ns}.createIndex(email_1 unique)"), fmt(r));
                }
                for _ in 0..self.rng.random_range(1..4) {
                    self.refresh(src).await;
                    let Some(id) = self.free_id(coll) else { break };
                    let e = self.email();
                    let d = fresh_doc(&mut self.rng, id, &e);
                    let what = format!("{ns}.insertOne({d})");
                    let r = c.insert_one(d).await.map(|_| "ok".to_string());
                    self.record(kind, what, fmt(r));
                }
            }
            "renamecoll" => {
                let Some(to) = COLL_NAMES.iter().find(|n| !self.colls.contains_key(**n)) else {
                    return;
                };
                let what = format!("renameCollection {ns} -> {to}");
                let r = src
                    .database("admin")
                    .run_command(doc! {"renameCollection": format!("{}.{coll}", self.db), "to": format!("{}.{to}", self.db)})
                    .await
                    .map(|_| "ok".to_string());
                // Documents reordered by a pipeline update keep their order under the new name.
                if r.is_ok() && self.reordered.contains(coll) {
                    self.reordered.insert(to.to_string());
                }
                self.record(kind, what, fmt(r));
            }
            "dropdb" => {
                let r = db.drop().await.map(|_| "ok".to_string());
                self.record(kind, "dropDatabase".into(), fmt(r));
                let e = self.email();
                let id = self.pool[self.rng.random_range(0..self.pool.len())]
                    .1
                    .clone();
                let d = fresh_doc(&mut self.rng, id, &e);
                let what = format!("a.insertOne({d}) (after dropDatabase)");
                let r = db
                    .collection::<Document>("a")
                    .insert_one(d)
                    .await
                    .map(|_| "ok".to_string());
                self.record(kind, what, fmt(r));
            }
            "index" => {
                let idx: Vec<Document> = match db.run_command(doc! {"listIndexes": coll}).await {
                    Ok(r) => r
                        .get_document("cursor")
                        .and_then(|c| c.get_array("firstBatch"))
                        .map(|a| a.iter().filter_map(|b| b.as_document().cloned()).collect())
                        .unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                let names: Vec<String> = idx
                    .iter()
                    .filter_map(|d| d.get_str("name").ok().map(str::to_string))
                    .filter(|n| n != "_id_")
                    .collect();
                if !names.is_empty() && self.rng.random_bool(0.4) {
                    let name = names[self.rng.random_range(0..names.len())].clone();
                    let what = format!("{ns}.dropIndex({name})");
                    let r = db
                        .run_command(doc! {"dropIndexes": coll, "index": name})
                        .await
                        .map(|_| "ok".to_string());
                    self.record(kind, what, fmt(r));
                } else {
                    let spec = match self.rng.random_range(0..3) {
                        0 => doc! {"key": {"email": 1}, "name": "email_1", "unique": true},
                        1 => doc! {"key": {"n": 1}, "name": "n_1"},
                        _ => {
                            doc! {"key": {"sub.x": -1, "n": 1}, "name": "subx_n", "partialFilterExpression": {"n": {"$gt": 1}}}
                        }
                    };
                    let what = format!("{ns}.createIndex({spec})");
                    let r = db
                        .run_command(doc! {"createIndexes": coll, "indexes": [spec]})
                        .await
                        .map(|_| "ok".to_string());
                    self.record(kind, what, fmt(r));
                }
            }
            "validator" => {
                let v = match self.rng.random_range(0..3) {
                    0 => {
                        doc! {"collMod": coll, "validator": {"n": {"$gte": 1}}, "validationLevel": "moderate"}
                    }
                    1 => doc! {"collMod": coll, "validator": {"email": {"$type": "string"}}},
                    _ => doc! {"collMod": coll, "validator": {}},
                };
                let what = format!("{v}");
                let r = db.run_command(v).await.map(|_| "ok".to_string());
                self.record(kind, what, fmt(r));
            }
            _ => unreachable!("unknown kind {kind}"),
        }
    }

    /// Keeps the unique `email` index valid on the source while moving values around: a swap
    /// through a temporary value, a chain (x→y then a new x), a delete and re-insert.
    async fn unique_dance(&mut self, src: &Client, coll: &str) {
        let c = src.database(&self.db).collection::<Document>(coll);
        let docs: Vec<(Bson, String)> = self
            .colls
            .get(coll)
            .map(|m| m.docs.values().cloned().collect())
            .unwrap_or_default();
        let kind = "unique";
        match self.rng.random_range(0..3) {
            0 if docs.len() >= 2 => {
                let i = self.rng.random_range(0..docs.len());
                let j = (i + 1 + self.rng.random_range(0..docs.len() - 1)) % docs.len();
                let ((a, ea), (b, eb)) = (docs[i].clone(), docs[j].clone());
                let tmp = self.email();
                for (id, e) in [
                    (a.clone(), tmp.clone()),
                    (b.clone(), ea.clone()),
                    (a.clone(), eb.clone()),
                ] {
                    let what = format!("{coll}.updateOne({{_id: {id}}}, $set email {e}) [swap]");
                    let r = c
                        .update_one(doc! {"_id": id}, doc! {"$set": {"email": e}})
                        .await
                        .map(|r| format!("matched {}", r.matched_count));
                    self.record(kind, what, fmt(r));
                }
            }
            1 if !docs.is_empty() => {
                let (a, x) = docs[self.rng.random_range(0..docs.len())].clone();
                let y = self.email();
                let what = format!("{coll}.updateOne({{_id: {a}}}, $set email {x}->{y}) [chain]");
                let r = c
                    .update_one(doc! {"_id": a}, doc! {"$set": {"email": y}})
                    .await
                    .map(|r| format!("matched {}", r.matched_count));
                self.record(kind, what, fmt(r));
                self.refresh(src).await;
                if let Some(id) = self.free_id(coll) {
                    let d = fresh_doc(&mut self.rng, id, &x);
                    let what = format!("{coll}.insertOne({d}) [chain: takes {x}]");
                    let r = c.insert_one(d).await.map(|_| "ok".to_string());
                    self.record(kind, what, fmt(r));
                }
            }
            _ if !docs.is_empty() => {
                let (a, x) = docs[self.rng.random_range(0..docs.len())].clone();
                let what = format!("{coll}.deleteOne({{_id: {a}}}) [reinsert]");
                let r = c
                    .delete_one(doc! {"_id": a})
                    .await
                    .map(|r| format!("deleted {}", r.deleted_count));
                self.record(kind, what, fmt(r));
                self.refresh(src).await;
                if let Some(id) = self.free_id(coll) {
                    let d = fresh_doc(&mut self.rng, id, &x);
                    let what = format!("{coll}.insertOne({d}) [reinsert: takes {x}]");
                    let r = c.insert_one(d).await.map(|_| "ok".to_string());
                    self.record(kind, what, fmt(r));
                }
            }
            _ => {}
        }
    }
}

fn fmt<T>(r: Result<T, mongodb::error::Error>) -> Result<T, String> {
    r.map_err(|e| match *e.kind {
        mongodb::error::ErrorKind::Command(ref c) => format!("code {}: {}", c.code, c.message),
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(ref w)) => {
            format!("code {}: {}", w.code, w.message)
        }
        _ => e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// The daemon process.

struct Daemon {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
    runs: usize,
}

impl Daemon {
    fn new(
        bin: &Path,
        dir: &Path,
        source: &SimHandle,
        dest: &SimHandle,
        scope: &str,
        batch_events: u64,
        ha: Option<(u32, &str)>,
    ) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let port = ports::free_port();
        // Two instances share the copy: a lease decides which one writes.
        let (write_bound, ha) = match ha {
            Some((partitions, fencing)) => (
                "socket_timeout_ms = 1000\n",
                format!("[ha]\nenabled = true\nlease_seconds = 3\npartitions = {partitions}\nfencing = \"{fencing}\"\n\n"),
            ),
            None => ("", String::new()),
        };
        let (scope, transactions) = match scope {
            "atomic" => ("auto", "atomic"),
            other => (other, "per-document"),
        };
        let config = format!(
            "[source]\nuri = \"{}\"\nstream_scope = \"{scope}\"\n\n[destination]\nuri = \"{}\"\n{write_bound}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n{ha}\
             [apply]\ntransactions = \"{transactions}\"\nbatch_max_events = {batch_events}\n\n\
             [checkpoint]\ninterval_seconds = 1\n\n[supervisor]\nmax_backoff_seconds = 1\nmax_restarts = 1000\n\n\
             [validation]\ninterval_seconds = 0\n\n[shutdown]\ntimeout_seconds = 10\n\n[log]\nlevel = \"info\"\n",
            source.uri(),
            dest.uri()
        );
        let path = dir.join("mongo-syncd.toml");
        std::fs::write(&path, config).unwrap();
        Daemon {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config: path,
            port,
            child: None,
            runs: 0,
        }
    }

    fn spawn(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log =
            std::fs::File::create(self.dir.join(format!("daemon-{}.log", self.runs))).unwrap();
        self.runs += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg("--config").arg(&self.config);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MONGO_SYNCD_") {
                cmd.env_remove(&name);
            }
        }
        cmd.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET");
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(
            isolated::spawn_isolated(&mut cmd)
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display())),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `active` or `standby` under `ha.enabled`, as its status says.
    /// How many partitions the instance holds (`ha.partitions` > 1).
    async fn held(&self) -> Option<usize> {
        Some(
            self.status().await?["ha"]["partitions"]["held"]
                .as_array()?
                .len(),
        )
    }

    async fn role(&self) -> Option<String> {
        self.status().await?["ha"]["role"]
            .as_str()
            .map(str::to_owned)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    async fn terminate(&mut self) {
        self.signal("TERM");
        let started = Instant::now();
        while self.child.is_some() && started.elapsed() < Duration::from_secs(30) {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill9();
    }

    /// `Some(code)` when the process exited by itself.
    fn exited(&mut self) -> Option<Option<i32>> {
        let c = self.child.as_mut()?;
        c.try_wait().ok().flatten().map(|s| s.code())
    }

    /// The last `lines` warnings and errors of every run (info lines would crowd out what
    /// explains a failure in CI's truncated output), each cut to 400 characters.
    fn logs_tail(&self, lines: usize) -> String {
        let all: Vec<String> = (0..self.runs)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("daemon-{i}.log")))
                    .unwrap_or_default()
            })
            .collect();
        let joined = all.join("\n--- restart ---\n");
        let v: Vec<String> = joined
            .lines()
            .filter(|l| !l.contains(" INFO ") && !l.contains(" DEBUG "))
            .map(|l| l.chars().take(400).collect())
            .collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    async fn get(&self, path: &str) -> Option<String> {
        let resp = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.text().await.ok()
    }

    async fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get("/api/v1/status").await?).ok()
    }

    /// Sum of the series of `metric` whose namespace label starts with `ns_prefix`.
    async fn metric_sum(&self, metric: &str, ns_prefix: &str) -> f64 {
        let Some(body) = self.get("/metrics").await else {
            return 0.0;
        };
        let needle = format!("namespace=\"{ns_prefix}");
        body.lines()
            .filter(|l| l.starts_with(metric) && l.contains(&needle))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// Faults.

#[derive(Debug, Clone)]
enum Fault {
    /// SIGKILL; restart at the given progress (the daemon is stopped across what happens between).
    Kill {
        restart_at: f64,
    },
    /// SIGKILL shortly after the (re)start, while it copies.
    KillCopy {
        after_ms: u64,
    },
    /// Hold the next checkpoint write, SIGKILL while it is held.
    KillCheckpoint,
    FailCommand {
        code: i32,
        times: u32,
    },
    Block {
        ms: u32,
        times: u32,
    },
    SourceClose,
    /// Shrink the source oplog, stop the daemon, write, restart, restore the oplog.
    HistoryLoss {
        capacity: usize,
        restart_at: f64,
    },
    /// SIGKILL the active instance; the standby takes over; the killed one restarts as standby.
    HaKill,
    /// SIGSTOP the active instance until the standby has taken over, then SIGCONT it.
    HaPause,
    /// SIGTERM the active instance (it hands the lease over); restart it as standby.
    HaHandover,
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { restart_at } if *restart_at > 0.0 => "stop_across",
            Fault::Kill { .. } => "kill",
            Fault::KillCopy { .. } => "kill_copy",
            Fault::KillCheckpoint => "kill_checkpoint",
            Fault::FailCommand { .. } => "failcmd",
            Fault::Block { .. } => "block",
            Fault::SourceClose => "src_close",
            Fault::HistoryLoss { .. } => "history_loss",
            Fault::HaKill => "ha_kill",
            Fault::HaPause => "ha_pause",
            Fault::HaHandover => "ha_handover",
        }
    }

    fn needs_ha(&self) -> bool {
        matches!(self, Fault::HaKill | Fault::HaPause | Fault::HaHandover)
    }
}

/// `(progress in 0..1, fault)`, sorted; progress is the fraction of the round's operations issued.
fn fault_schedule(seed: u64, kinds: &Kinds) -> Vec<(f64, Fault)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xFA17_5EED);
    let mut out = Vec::new();
    let n = rng.random_range(1..4);
    for _ in 0..n {
        let enabled: Vec<&str> = FAULT_KINDS
            .iter()
            .copied()
            .filter(|k| kinds.has(k))
            .collect();
        if enabled.is_empty() {
            break;
        }
        let at: f64 = rng.random_range(0.05..0.9);
        let f = match enabled[rng.random_range(0..enabled.len())] {
            "kill" => Fault::Kill { restart_at: 0.0 },
            "stop_across" => Fault::Kill {
                restart_at: (at + rng.random_range(0.05..0.3)).min(0.99),
            },
            "kill_copy" => Fault::KillCopy {
                after_ms: rng.random_range(50..1500),
            },
            "kill_checkpoint" => Fault::KillCheckpoint,
            "failcmd" => Fault::FailCommand {
                code: [91, 189, 11602, 10107, 6][rng.random_range(0..5)],
                times: rng.random_range(1..6),
            },
            "block" => Fault::Block {
                ms: rng.random_range(100..800),
                times: rng.random_range(1..4),
            },
            "src_close" => Fault::SourceClose,
            "ha_kill" => Fault::HaKill,
            "ha_pause" => Fault::HaPause,
            "ha_handover" => Fault::HaHandover,
            _ => Fault::HistoryLoss {
                capacity: rng.random_range(20..80),
                restart_at: (at + 0.3).min(0.99),
            },
        };
        // A copy-time kill only makes sense at the start.
        let at = if matches!(f, Fault::KillCopy { .. }) {
            0.0
        } else {
            at
        };
        out.push((at, f));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------------------------
// A round.

/// What one round found.
#[derive(Debug, Default)]
pub struct RoundReport {
    pub first_seed: u64,
    pub seeds: u64,
    /// `source.stream_scope` the round ran with.
    pub stream_scope: String,
    /// `apply.batch_max_events` the round ran with.
    pub batch_events: u64,
    pub ops: u64,
    pub source_errors: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub op_kinds: BTreeMap<&'static str, u64>,
    pub duration: Duration,
    pub quiesce: Duration,
    /// One entry per failing seed (or the round as a whole, seed = first seed).
    pub failures: Vec<String>,
}

struct Shared {
    progress: AtomicU64,
    total: u64,
}

/// Runs seeds `first..first + count` in one round.
pub async fn run_round(opts: &Options, first: u64, count: u64) -> RoundReport {
    let started = Instant::now();
    let mut report = RoundReport {
        first_seed: first,
        seeds: count,
        stream_scope: opts.scope_of(first).to_string(),
        batch_events: opts.batch_events_of(first),
        ..Default::default()
    };
    let schedule = fault_schedule(first, &opts.faults);
    let source = MongoSim::builder()
        .replica_set("soaksrc")
        .noop_interval(Duration::from_millis(250))
        .start()
        .await
        .expect("source simulator");
    let dest = MongoSim::builder()
        .replica_set("soakdst")
        .noop_interval(Duration::from_millis(250))
        .start()
        .await
        .expect("destination simulator");
    let src = Client::with_uri_str(source.uri()).await.unwrap();
    let dst = Client::with_uri_str(dest.uri()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ha = schedule.iter().any(|(_, f)| f.needs_ha());
    // Half the HA rounds split the namespaces into two partitions: both instances sync, and a
    // fault moves the victim's partition to the other.
    // and half of them fence streaming batches with destination transactions.
    let mut ha_rng = StdRng::seed_from_u64(first ^ 0x5eed_0a11);
    let partitions: u32 = if ha_rng.random_bool(0.5) { 2 } else { 1 };
    let fencing = if ha_rng.random_bool(0.5) {
        "transaction"
    } else {
        "lease"
    };
    let mut daemon = Daemon::new(
        &opts.daemon_bin,
        dir.path(),
        &source,
        &dest,
        opts.scope_of(first),
        opts.batch_events_of(first),
        ha.then_some((partitions, fencing)),
    );
    // With HA faults the round runs a second instance; `daemon` is kept the active one.
    let mut standby = ha.then(|| {
        Daemon::new(
            &opts.daemon_bin,
            &dir.path().join("standby"),
            &source,
            &dest,
            opts.scope_of(first),
            opts.batch_events_of(first),
            Some((partitions, fencing)),
        )
    });
    let fault_log: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(
        schedule
            .iter()
            .map(|(at, f)| format!("planned at {at:.2}: {f:?}"))
            .chain(ha.then(|| {
                format!("two instances: ha.partitions = {partitions}, ha.fencing = {fencing:?}")
            }))
            .collect(),
    ));

    // Scenarios: set up, then a fifth of their operations before the daemon starts (the copy
    // has work and history).
    let mut scenarios: Vec<Scenario> = (first..first + count)
        .map(|seed| Scenario::new(seed, &opts.ops))
        .collect();
    for s in &mut scenarios {
        s.setup(&src).await;
    }
    let pre = opts.ops_per_seed / 5;
    let shared = Arc::new(Shared {
        progress: AtomicU64::new(0),
        total: (opts.ops_per_seed * scenarios.len()) as u64,
    });
    scenarios = run_ops(&src, scenarios, pre, opts, &shared).await;

    daemon.spawn();
    if let Some(standby) = standby.as_mut() {
        wait_role(&daemon, "active", HA_TAKEOVER_WAIT).await;
        standby.spawn();
    }
    let t0 = Instant::now();
    for (_, f) in schedule
        .iter()
        .filter(|(_, f)| matches!(f, Fault::KillCopy { .. }))
    {
        if let Fault::KillCopy { after_ms } = f {
            tokio::time::sleep(Duration::from_millis(*after_ms)).await;
            fault_log
                .lock()
                .push(format!("{:?}: kill -9 during copy, restart", t0.elapsed()));
            daemon.kill9();
            daemon.spawn();
            *report.faults.entry("kill_copy").or_default() += 1;
        }
    }

    // The rest of the operations, with the faults fired at their progress points: half while
    // the daemon copies, half once it streams (or after `STREAMING_WAIT`), so the stream
    // phase sees histories and backlogs of its own and not only what the copy left.
    let ops_task = {
        let src = src.clone();
        let opts = opts.clone();
        let shared = Arc::clone(&shared);
        let rest = opts.ops_per_seed - pre;
        let port = daemon.port;
        tokio::spawn(async move {
            let scenarios = run_ops(&src, scenarios, rest / 2, &opts, &shared).await;
            wait_ready(port, STREAMING_WAIT).await;
            run_ops(&src, scenarios, rest - rest / 2, &opts, &shared).await
        })
    };
    let mut pending: Vec<(f64, Fault)> = schedule
        .iter()
        .filter(|(_, f)| !matches!(f, Fault::KillCopy { .. }))
        .cloned()
        .collect();
    let mut restarts: Vec<(f64, Option<usize>)> = Vec::new();
    let mut ha_problems: Vec<String> = Vec::new();
    loop {
        let done = ops_task.is_finished();
        let p = if done {
            2.0
        } else {
            shared.progress.load(Ordering::Relaxed) as f64 / shared.total.max(1) as f64
        };
        while let Some(pos) = restarts.iter().position(|(at, _)| *at <= p) {
            let (_, restore) = restarts.remove(pos);
            if let Some(cap) = restore {
                // History loss: restart first (the history is already gone), then restore.
                daemon.spawn();
                if let Some(standby) = standby.as_mut() {
                    standby.spawn();
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                source.set_oplog_capacity(cap);
                fault_log.lock().push(format!(
                    "{:?} p={p:.2}: restart, oplog restored",
                    t0.elapsed()
                ));
            } else {
                daemon.spawn();
                fault_log
                    .lock()
                    .push(format!("{:?} p={p:.2}: restart", t0.elapsed()));
            }
        }
        while pending.first().is_some_and(|(at, _)| *at <= p) {
            let (_, f) = pending.remove(0);
            if let Some(standby) = standby.as_mut() {
                keep_active_first(&mut daemon, standby).await;
            }
            *report.faults.entry(f.kind()).or_default() += 1;
            fault_log
                .lock()
                .push(format!("{:?} p={p:.2}: fire {f:?}", t0.elapsed()));
            match f {
                Fault::Kill { restart_at } => {
                    daemon.kill9();
                    if restart_at > 0.0 && !done {
                        restarts.push((restart_at, None));
                    } else {
                        daemon.spawn();
                    }
                }
                Fault::KillCopy { .. } => {}
                Fault::KillCheckpoint => {
                    let _ = dest.configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": {"times": 1},
                        "data": {"failCommands": ["update"], "namespace": "mongo_syncd.checkpoints", "blockConnection": true, "blockTimeMS": 3000, "appName": "mongo-syncd"}});
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    daemon.kill9();
                    let _ = dest.configure_fail_point(
                        &doc! {"configureFailPoint": "failCommand", "mode": "off"},
                    );
                    daemon.spawn();
                }
                Fault::FailCommand { code, times } => {
                    let times = i64::from(times);
                    let _ = dest.configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": {"times": times},
                        "data": {"failCommands": ["insert", "update", "delete"], "errorCode": code, "errorLabels": ["RetryableWriteError"], "appName": "mongo-syncd"}});
                }
                Fault::Block { ms, times } => {
                    let (ms, times) = (i64::from(ms), i64::from(times));
                    let _ = dest.configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": {"times": times},
                        "data": {"failCommands": ["insert", "update", "delete"], "blockConnection": true, "blockTimeMS": ms, "appName": "mongo-syncd"}});
                }
                Fault::SourceClose => {
                    source.drop_connections();
                }
                Fault::HaKill | Fault::HaPause | Fault::HaHandover => {
                    let Some(standby) = standby.as_mut() else {
                        continue;
                    };
                    // A takeover needs a live standby: start the other instance if an earlier
                    // fault left it stopped, and wait until it stands by.
                    if daemon.child.is_none() {
                        std::mem::swap(&mut daemon, standby);
                    }
                    standby.spawn();
                    if partitions > 1 {
                        // Both sync a share of the partitions before the fault.
                        daemon.spawn();
                        wait_held(&daemon, 1, HA_TAKEOVER_WAIT).await;
                        wait_held(standby, 1, HA_TAKEOVER_WAIT).await;
                    } else {
                        wait_role(standby, "standby", HA_TAKEOVER_WAIT).await;
                        daemon.spawn();
                        wait_role(&daemon, "active", HA_TAKEOVER_WAIT).await;
                    }
                    match f {
                        Fault::HaKill => daemon.kill9(),
                        Fault::HaPause => daemon.signal("STOP"),
                        _ => daemon.terminate().await,
                    }
                    let fired = Instant::now();
                    let paused = matches!(f, Fault::HaPause).then(|| daemon.pid()).flatten();
                    let watch_pause = watch_paused(paused, fired);
                    let took_over = if partitions > 1 {
                        wait_held(standby, partitions as usize, HA_TAKEOVER_WAIT).await
                    } else {
                        wait_role(standby, "active", HA_TAKEOVER_WAIT).await
                    };
                    let pause = watch_pause.finish();
                    fault_log.lock().push(format!(
                        "{:?}: standby active: {took_over} after {:?}",
                        t0.elapsed(),
                        fired.elapsed()
                    ));
                    if !took_over {
                        ha_problems.push(format!(
                            "{f:?}: the standby did not take over within {HA_TAKEOVER_WAIT:?}\n{}",
                            takeover_diagnosis(&daemon, standby, &dst, pause).await
                        ));
                    }
                    if matches!(f, Fault::HaPause) {
                        daemon.signal("CONT");
                    } else {
                        daemon.spawn();
                    }
                    std::mem::swap(&mut daemon, standby);
                }
                Fault::HistoryLoss {
                    capacity,
                    restart_at,
                } => {
                    daemon.kill9();
                    // Nobody syncs while the oplog is small: the standby would take over and
                    // re-copy against an oplog too small for the load.
                    if let Some(standby) = standby.as_mut() {
                        standby.kill9();
                    }
                    source.set_oplog_capacity(capacity);
                    if done {
                        // Nothing more will be written: write no-ops past the small oplog.
                        for _ in 0..capacity + 5 {
                            source.write_noop();
                        }
                        daemon.spawn();
                        if let Some(standby) = standby.as_mut() {
                            standby.spawn();
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        source.set_oplog_capacity(1_000_000);
                    } else {
                        restarts.push((restart_at, Some(1_000_000)));
                    }
                }
            }
        }
        if done && pending.is_empty() && restarts.is_empty() {
            break;
        }
        if done {
            // Fire whatever is left now.
            for r in &mut restarts {
                r.0 = 0.0;
            }
            for f in &mut pending {
                f.0 = 0.0;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let scenarios = ops_task.await.expect("operations task");
    let _ = dest.configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"});
    daemon.spawn();
    if let Some(standby) = standby.as_mut() {
        standby.spawn();
    }
    for s in &scenarios {
        report.ops += s.kinds_used.values().sum::<u64>();
        report.source_errors += s.source_errors;
        for (k, n) in &s.kinds_used {
            *report.op_kinds.entry(k).or_default() += n;
        }
    }

    // Quiescence: every source namespace of the round streaming and applied past the end.
    let q0 = Instant::now();
    let end = source.engine().cluster_time();
    let source_namespaces = namespaces_of(&src, &scenarios).await;
    let mut last_reason = String::new();
    let caught_up = loop {
        if let Some(standby) = standby.as_mut() {
            keep_active_first(&mut daemon, standby).await;
            if let Some(Some(code)) = standby.exited() {
                last_reason = format!("the second instance exited with {code:?}");
                break false;
            }
        }
        if let Some(Some(code)) = daemon.exited() {
            last_reason = format!("daemon exited with {code:?}");
            break false;
        }
        let status = match standby.as_ref().filter(|_| partitions > 1) {
            // Partitioned: each instance reports the namespaces of its own partitions.
            Some(other) => match (daemon.status().await, other.status().await) {
                (Some(mut mine), Some(theirs)) => {
                    if let (Some(m), Some(t)) = (
                        mine["namespaces"].as_object_mut(),
                        theirs["namespaces"].as_object(),
                    ) {
                        for (ns, v) in t {
                            m.entry(ns.clone()).or_insert_with(|| v.clone());
                        }
                    }
                    Some(mine)
                }
                (one, None) | (None, one) => one,
            },
            None => daemon.status().await,
        };
        match status {
            Some(st) => {
                let behind: Vec<String> = source_namespaces
                    .iter()
                    .filter(|ns| {
                        let n = &st["namespaces"][ns.as_str()];
                        let t = n["applied_through"]["t"].as_u64().unwrap_or(0) as u32;
                        let i = n["applied_through"]["i"].as_u64().unwrap_or(0) as u32;
                        n["state"].as_str() != Some("streaming")
                            || Timestamp {
                                time: t,
                                increment: i,
                            } < end
                    })
                    .map(|ns| {
                        let n = &st["namespaces"][ns.as_str()];
                        format!(
                            "{ns}: state {} parked {} applied {} last error {}",
                            n["state"], n["parked_reason"], n["applied_through"], n["last_error"]
                        )
                    })
                    .collect();
                if behind.is_empty() {
                    break true;
                }
                last_reason = behind.join("; ");
            }
            None => last_reason = "status unavailable".into(),
        }
        if q0.elapsed() > opts.quiesce_timeout {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    report.quiesce = q0.elapsed();

    // The oracle.
    let schedule_text = fault_log.lock().join("\n    ");
    let mut round_problems = ha_problems;
    if !caught_up {
        round_problems.push(format!(
            "not caught up after {:?}: {last_reason}",
            opts.quiesce_timeout
        ));
    }
    let dead_letters: Vec<Document> = match dst
        .database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .find(doc! {})
        .await
    {
        Ok(cursor) => cursor.try_collect().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    // A short grace, shared by the round: a namespace may have reported its position a moment
    // before its last write was visible.
    let deadline = Instant::now() + Duration::from_secs(if caught_up { 3 } else { 1 });
    for s in &scenarios {
        let mut problems = loop {
            let p = compare_db(&src, &dst, s).await;
            if p.is_empty() || Instant::now() > deadline {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let prefix = format!("{}.", s.db);
        for d in &dead_letters {
            if d.get_str("ns").is_ok_and(|ns| ns.starts_with(&prefix)) {
                problems.push(format!("dead letter: {d}"));
            }
        }
        let skipped = daemon
            .metric_sum("mongo_syncd_replay_skipped_total", &format!("{}.", s.db))
            .await;
        if skipped > 0.0 {
            problems.push(format!("replay_skipped_total = {skipped}"));
        }
        if !problems.is_empty() {
            report.failures.push(format!(
                "SOAK FAILURE seed {} (round {first}..{}):\n  {}\n  fault schedule:\n    {schedule_text}\n  reordering pipeline updates on: {:?}\n  operation log:\n    {}\n  rerun: {}",
                s.seed,
                first + count,
                problems.join("\n  "),
                s.reordered,
                s.log.join("\n    "),
                opts.rerun_command(first, count)
            ));
        }
    }
    if let Some(Some(code)) = daemon.exited() {
        round_problems.push(format!("daemon exited by itself with {code:?}"));
    }
    if !round_problems.is_empty() || !report.failures.is_empty() {
        let header = format!(
            "SOAK ROUND {first}..{} problems: {}\n  fault schedule:\n    {schedule_text}\n  daemon warnings and errors (last 30):\n{}",
            first + count,
            if round_problems.is_empty() { "(per seed below)".to_string() } else { round_problems.join("; ") },
            match &standby {
                Some(other) => format!(
                    "{}\n  the other instance (last 15):\n{}",
                    daemon.logs_tail(30),
                    other.logs_tail(15)
                ),
                None => daemon.logs_tail(30),
            }
        );
        // After the per-seed reports: CI keeps only so much output, and they say what diverged.
        report.failures.push(header);
    }
    daemon.kill9();
    if !report.failures.is_empty() {
        // Keep the daemon's logs of a failing round.
        let kept = dir.keep();
        let last = report.failures.len() - 1;
        report.failures[last].push_str(&format!("\n  daemon logs kept in {}", kept.display()));
    }
    source.shutdown().await;
    dest.shutdown().await;
    report.duration = started.elapsed();
    report
}

/// How long a standby may take to become active after the active died, froze or stopped:
/// a 3 s lease, a renew period and the write bound, with room for a loaded machine.
const HA_TAKEOVER_WAIT: Duration = Duration::from_secs(15);

/// Waits until `d` reports `role`, at most `bound`; whether it did.
async fn wait_role(d: &Daemon, role: &str, bound: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < bound {
        if d.role().await.as_deref() == Some(role) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The scheduler state of process `pid` (`T`: stopped), from `/proc`.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Watches a paused instance while the standby should take over: a pause must last until
/// the harness sends SIGCONT, and a failed takeover must say when it did not.
struct PauseWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<String>>,
}

impl PauseWatch {
    /// What the pause looked like: held throughout, resumed (when), or never seen stopped.
    fn finish(self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .and_then(|t| t.join().ok())
            .unwrap_or_else(|| "not a pause".to_owned())
    }
}

fn watch_paused(pid: Option<u32>, since: Instant) -> PauseWatch {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = pid.map(|pid| {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut stopped_at = None;
            while !stop.load(Ordering::Relaxed) {
                match (proc_state(pid), stopped_at) {
                    (Some('T') | Some('t'), None) => stopped_at = Some(since.elapsed()),
                    (Some('T') | Some('t'), Some(_)) | (_, None) => {}
                    (state, Some(at)) => {
                        return format!(
                            "stopped at {at:?}, running again ({state:?}) at {:?} without SIGCONT from the harness",
                            since.elapsed()
                        )
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            match stopped_at {
                Some(at) => format!("stopped from {at:?} to the end of the wait"),
                None => "never seen stopped".to_owned(),
            }
        })
    });
    PauseWatch { stop, thread }
}

/// What a failed takeover looked like: both processes' states, the standby's view, and the
/// lease as the destination has it.
async fn takeover_diagnosis(old: &Daemon, standby: &Daemon, dst: &Client, pause: String) -> String {
    let state = |d: &Daemon| d.pid().map(|pid| (pid, proc_state(pid)));
    let standby_ha = match tokio::time::timeout(Duration::from_secs(2), standby.status()).await {
        Ok(Some(s)) => s["ha"].to_string(),
        Ok(None) => "no answer".to_owned(),
        Err(_) => "no answer within 2s".to_owned(),
    };
    let lease: Vec<Document> = match dst
        .database("mongo_syncd")
        .collection::<Document>("leases")
        .find(doc! {})
        .await
    {
        Ok(cursor) => cursor.try_collect().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    format!(
        "    paused instance (pid, state): {:?}; its pause: {pause}\n    \
         standby (pid, state): {:?}; its status.ha: {standby_ha}\n    \
         leases on the destination at {}: {lease:?}",
        state(old),
        state(standby),
        bson::DateTime::now(),
    )
}

/// Waits until `d` holds at least `n` partitions (`ha.partitions` > 1), at most `bound`.
async fn wait_held(d: &Daemon, n: usize, bound: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < bound {
        if d.held().await.is_some_and(|held| held >= n) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Swaps the two instances when the second one is the active one, so faults and the oracle
/// address the instance that writes.
async fn keep_active_first(daemon: &mut Daemon, other: &mut Daemon) {
    if daemon.role().await.as_deref() != Some("active")
        && other.role().await.as_deref() == Some("active")
    {
        std::mem::swap(daemon, other);
    }
}

/// Runs `n` more operations of every scenario concurrently; returns the scenarios.
/// How long the second half of a round's operations waits for the daemon to stream every
/// namespace (a daemon killed and not yet restarted never does).
const STREAMING_WAIT: Duration = Duration::from_secs(10);

/// Waits until the daemon on `port` answers `/readyz` with 200 (every namespace streaming),
/// at most `bound`.
async fn wait_ready(port: u16, bound: Duration) {
    let started = Instant::now();
    while started.elapsed() < bound {
        let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_ops(
    src: &Client,
    scenarios: Vec<Scenario>,
    n: usize,
    opts: &Options,
    shared: &Arc<Shared>,
) -> Vec<Scenario> {
    let tasks: Vec<_> = scenarios
        .into_iter()
        .map(|mut s| {
            let src = src.clone();
            let kinds = opts.ops.clone();
            let shared = Arc::clone(shared);
            tokio::spawn(async move {
                for _ in 0..n {
                    s.step(&src, &kinds).await;
                    shared.progress.fetch_add(1, Ordering::Relaxed);
                }
                s
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("scenario task"));
    }
    out
}

async fn namespaces_of(src: &Client, scenarios: &[Scenario]) -> Vec<String> {
    let mut out = Vec::new();
    for s in scenarios {
        for name in src
            .database(&s.db)
            .list_collection_names()
            .await
            .unwrap_or_default()
        {
            if !name.starts_with("system.") {
                out.push(format!("{}.{name}", s.db));
            }
        }
    }
    out
}

/// Recursively sorts the fields of a document (order-insensitive comparison).
fn normalise(d: &Document) -> Document {
    let mut keys: Vec<&String> = d.keys().collect();
    keys.sort();
    let mut out = Document::new();
    for k in keys {
        out.insert(k.clone(), normalise_value(&d[k.as_str()]));
    }
    out
}

fn normalise_value(b: &Bson) -> Bson {
    match b {
        Bson::Document(d) => Bson::Document(normalise(d)),
        Bson::Array(a) => Bson::Array(a.iter().map(normalise_value).collect()),
        other => other.clone(),
    }
}

async fn collection_specs(client: &Client, db: &str) -> BTreeMap<String, Document> {
    let mut out = BTreeMap::new();
    if let Ok(c) = client
        .database(db)
        .run_command(doc! {"listCollections": 1})
        .await
    {
        for spec in c
            .get_document("cursor")
            .and_then(|c| c.get_array("firstBatch"))
            .cloned()
            .unwrap_or_default()
        {
            let Some(spec) = spec.as_document() else {
                continue;
            };
            let name = spec.get_str("name").unwrap_or("").to_string();
            if name.starts_with("system.") {
                continue;
            }
            out.insert(
                name,
                spec.get_document("options").cloned().unwrap_or_default(),
            );
        }
    }
    out
}

async fn index_specs(client: &Client, db: &str, coll: &str) -> BTreeMap<String, Document> {
    let mut out = BTreeMap::new();
    if let Ok(c) = client
        .database(db)
        .run_command(doc! {"listIndexes": coll})
        .await
    {
        for spec in c
            .get_document("cursor")
            .and_then(|c| c.get_array("firstBatch"))
            .cloned()
            .unwrap_or_default()
        {
            let Some(spec) = spec.as_document() else {
                continue;
            };
            let mut spec = spec.clone();
            spec.remove("v");
            spec.remove("ns");
            out.insert(
                spec.get_str("name").unwrap_or("").to_string(),
                normalise(&spec),
            );
        }
    }
    out
}

async fn dump(client: &Client, db: &str, coll: &str) -> Vec<RawDocumentBuf> {
    match client
        .database(db)
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await
    {
        Ok(c) => c.try_collect().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// The differences between the source and destination database of one scenario.
async fn compare_db(src: &Client, dst: &Client, s: &Scenario) -> Vec<String> {
    let mut problems = Vec::new();
    let a = collection_specs(src, &s.db).await;
    let b = collection_specs(dst, &s.db).await;
    let names_a: Vec<&String> = a.keys().collect();
    let names_b: Vec<&String> = b.keys().collect();
    if names_a != names_b {
        problems.push(format!(
            "collections differ: source {names_a:?}, destination {names_b:?}"
        ));
    }
    for (name, opts_a) in &a {
        let Some(opts_b) = b.get(name) else { continue };
        if normalise(opts_a) != normalise(opts_b) {
            problems.push(format!(
                "{name}: options differ: source {opts_a}, destination {opts_b}"
            ));
        }
        let ia = index_specs(src, &s.db, name).await;
        let ib = index_specs(dst, &s.db, name).await;
        if ia != ib {
            problems.push(format!(
                "{name}: indexes differ: source {:?}, destination {:?}",
                ia.values().map(|d| d.to_string()).collect::<Vec<_>>(),
                ib.values().map(|d| d.to_string()).collect::<Vec<_>>()
            ));
        }
        let da = dump(src, &s.db, name).await;
        let db_ = dump(dst, &s.db, name).await;
        let order_free = s.reordered.contains(name);
        let doc = |r: &RawDocumentBuf| -> Document { r.try_into().unwrap_or_default() };
        let ids = |v: &[RawDocumentBuf]| -> Vec<String> {
            v.iter()
                .map(|r| format!("{}", doc(r).get("_id").cloned().unwrap_or(Bson::Null)))
                .collect()
        };
        if da.len() != db_.len() {
            problems.push(format!(
                "{name}: {} documents on the source {:?}, {} on the destination {:?}",
                da.len(),
                ids(&da),
                db_.len(),
                ids(&db_)
            ));
            continue;
        }
        for (x, y) in da.iter().zip(&db_) {
            let same = if order_free {
                normalise(&doc(x)) == normalise(&doc(y))
            } else {
                x.as_bytes() == y.as_bytes()
            };
            if !same {
                problems.push(format!(
                    "{name}: source {} != destination {}{}",
                    doc(x),
                    doc(y),
                    if order_free {
                        " (compared order-insensitively)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    problems
}

/// Runs all seeds of `opts`, `opts.parallel` rounds at a time; returns the round reports.
pub async fn run(opts: &Options) -> Vec<RoundReport> {
    let mut starts = Vec::new();
    let mut s = opts.first_seed;
    let end = opts.first_seed + opts.seeds;
    while s < end {
        let n = opts.per_round.min(end - s);
        starts.push((s, n));
        s += n;
    }
    let mut reports = Vec::new();
    for chunk in starts.chunks(opts.parallel) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|&(first, n)| {
                let opts = opts.clone();
                tokio::spawn(async move { run_round(&opts, first, n).await })
            })
            .collect();
        for h in handles {
            let r = h.await.expect("round task");
            if opts.verbose || !r.failures.is_empty() {
                eprintln!("{}", summary_line(&r));
            }
            reports.push(r);
        }
    }
    reports
}

pub fn summary_line(r: &RoundReport) -> String {
    format!(
        "round seeds {}..{} (stream_scope {}, batch_max_events {}): {} ops ({} source errors), faults {:?}, {:.1}s (quiesce {:.1}s), {} failure(s)",
        r.first_seed,
        r.first_seed + r.seeds,
        r.stream_scope,
        r.batch_events,
        r.ops,
        r.source_errors,
        r.faults,
        r.duration.as_secs_f64(),
        r.quiesce.as_secs_f64(),
        r.failures.len().saturating_sub(1)
    )
}

/// Totals over rounds: seeds, operations per kind, faults per kind, time per seed.
pub fn totals(reports: &[RoundReport]) -> String {
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    let mut scopes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut batches: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut seeds, mut ops, mut errs, mut failed) = (0, 0, 0, 0);
    let mut time = Duration::ZERO;
    for r in reports {
        seeds += r.seeds;
        ops += r.ops;
        errs += r.source_errors;
        failed += r.failures.len().saturating_sub(1);
        time += r.duration;
        for (k, n) in &r.faults {
            *faults.entry(k).or_default() += n;
        }
        for (k, n) in &r.op_kinds {
            *kinds.entry(k).or_default() += n;
        }
        *scopes.entry(r.stream_scope.as_str()).or_default() += 1;
        *batches.entry(r.batch_events).or_default() += 1;
    }
    let mut out = String::new();
    let _ = write!(
        out,
        "soak: {seeds} seeds in {} rounds, {ops} operations ({errs} refused by the source), {failed} failing seed(s); round time {:.1}s total, {:.2}s per seed\n  rounds by stream_scope: {scopes:?}\n  rounds by batch_max_events: {batches:?}\n  faults: {faults:?}\n  operations: {kinds:?}",
        reports.len(),
        time.as_secs_f64(),
        time.as_secs_f64() / seeds.max(1) as f64
    );
    out
}

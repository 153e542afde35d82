//! Validation reports: one document per pass and namespace in
//! `<checkpoint.database>.validations`. The document is written when the pass starts, updated
//! after every finished range (it is also the pass's progress record: `next_lower` is where an
//! interrupted pass continues), and finished with its result.

use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use futures::TryStreamExt;
use mongodb::{options::ReadConcern, Collection, Database};
use serde_json::{json, Value};

use crate::{
    config::ValidationMode,
    error::{ErrorKind, SyncError},
    metrics::ValidationResult,
};

pub const VALIDATIONS_COLLECTION: &str = "validations";
/// `_id`s stored per class and range; the counts stay exact beyond it.
pub const MAX_IDS_PER_CLASS: usize = 1_000;
/// `_id`s stored per report (keeps the document far below 16 MiB).
pub const MAX_IDS_PER_REPORT: usize = 10_000;

/// Who ran the pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// The daemon's scheduler (interval, SIGUSR2, HTTP).
    Daemon,
    /// `mongo-syncd validate`.
    Cli,
}

impl Runner {
    pub fn as_str(self) -> &'static str {
        match self {
            Runner::Daemon => "daemon",
            Runner::Cli => "cli",
        }
    }
}

/// Lifecycle of a report document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassState {
    Running,
    Finished,
    /// A running pass that will not be continued (the collection was recreated, or a
    /// `validate` command was interrupted).
    Abandoned,
}

impl PassState {
    pub fn as_str(self) -> &'static str {
        match self {
            PassState::Running => "running",
            PassState::Finished => "finished",
            PassState::Abandoned => "abandoned",
        }
    }

    fn parse(s: &str) -> PassState {
        match s {
            "running" => PassState::Running,
            "finished" => PassState::Finished,
            _ => PassState::Abandoned,
        }
    }
}

fn parse_result(s: &str) -> Option<ValidationResult> {
    ValidationResult::ALL
        .iter()
        .copied()
        .find(|r| r.as_str() == s)
}

/// `_id`s of one class: an exact count and the first [`MAX_IDS_PER_CLASS`] values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdList {
    pub count: u64,
    pub ids: Vec<Bson>,
}

impl IdList {
    pub fn push(&mut self, id: Bson) {
        self.count += 1;
        if self.ids.len() < MAX_IDS_PER_CLASS {
            self.ids.push(id);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn to_bson(&self) -> Bson {
        Bson::Document(doc! {"count": self.count as i64, "ids": self.ids.clone()})
    }

    fn from_bson(b: Option<&Bson>) -> IdList {
        let Some(Bson::Document(d)) = b else {
            return IdList::default();
        };
        IdList {
            count: d.get_i64("count").unwrap_or(0).max(0) as u64,
            ids: d.get_array("ids").cloned().unwrap_or_default(),
        }
    }
}

/// What a repair of one range did.
#[derive(Debug, Clone, PartialEq)]
pub struct RepairFinding {
    /// Source documents written over the destination.
    pub upserted: u64,
    /// Destination documents deleted (absent on the source).
    pub deleted: u64,
    /// The re-check after the repair.
    pub after: ValidationResult,
    pub error: Option<String>,
}

/// An `_id` range where the two sides differed (or could not be verified).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RangeFinding {
    /// Inclusive lower bound; `None` = MinKey.
    pub lower: Option<Bson>,
    /// Exclusive upper bound; `None` = MaxKey.
    pub upper: Option<Bson>,
    /// On the source, not on the destination.
    pub missing: IdList,
    /// On the destination, not on the source.
    pub extra: IdList,
    /// On both, with different content.
    pub content: IdList,
    /// On both, same fields and values in another order.
    pub order_only: IdList,
    /// Changed on the source during every re-check: neither match nor drift.
    pub unverified: IdList,
    pub repair: Option<RepairFinding>,
}

impl RangeFinding {
    /// Documents that drifted (order-only differences count with `strict_order`).
    pub fn drift(&self, strict_order: bool) -> u64 {
        self.missing.count
            + self.extra.count
            + self.content.count
            + if strict_order {
                self.order_only.count
            } else {
                0
            }
    }

    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.content.is_empty()
            && self.order_only.is_empty()
            && self.unverified.is_empty()
    }

    fn ids_stored(&self) -> usize {
        [
            &self.missing,
            &self.extra,
            &self.content,
            &self.order_only,
            &self.unverified,
        ]
        .iter()
        .map(|l| l.ids.len())
        .sum()
    }

    fn to_document(&self) -> Document {
        let mut d = doc! {
            "lower": self.lower.clone().unwrap_or(Bson::MinKey),
            "upper": self.upper.clone().unwrap_or(Bson::MaxKey),
            "missing": self.missing.to_bson(),
            "extra": self.extra.to_bson(),
            "content": self.content.to_bson(),
            "order_only": self.order_only.to_bson(),
            "unverified": self.unverified.to_bson(),
        };
        if let Some(r) = &self.repair {
            d.insert(
                "repair",
                doc! {
                    "upserted": r.upserted as i64,
                    "deleted": r.deleted as i64,
                    "after": r.after.as_str(),
                    "error": r.error.clone().map(Bson::String).unwrap_or(Bson::Null),
                },
            );
        }
        d
    }

    fn from_document(d: &Document) -> RangeFinding {
        let bound = |k: &str| match d.get(k) {
            None | Some(Bson::MinKey) | Some(Bson::MaxKey) | Some(Bson::Null) => None,
            Some(b) => Some(b.clone()),
        };
        RangeFinding {
            lower: bound("lower"),
            upper: bound("upper"),
            missing: IdList::from_bson(d.get("missing")),
            extra: IdList::from_bson(d.get("extra")),
            content: IdList::from_bson(d.get("content")),
            order_only: IdList::from_bson(d.get("order_only")),
            unverified: IdList::from_bson(d.get("unverified")),
            repair: d.get_document("repair").ok().map(|r| RepairFinding {
                upserted: r.get_i64("upserted").unwrap_or(0).max(0) as u64,
                deleted: r.get_i64("deleted").unwrap_or(0).max(0) as u64,
                after: r
                    .get_str("after")
                    .ok()
                    .and_then(parse_result)
                    .unwrap_or(ValidationResult::Error),
                error: r.get_str("error").ok().map(str::to_string),
            }),
        }
    }
}

/// A collection option that differs between the two sides.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionDiff {
    pub option: String,
    pub source: Bson,
    pub destination: Bson,
}

/// One validation pass over one namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub id: ObjectId,
    pub sync_id: String,
    /// Source namespace.
    pub namespace: String,
    /// Destination namespace.
    pub target: String,
    pub collection_uuid: Option<bson::Uuid>,
    pub runner: Runner,
    /// `schedule`, `request` (SIGUSR2 or HTTP) or `command`; a resumed pass keeps its own.
    pub trigger: String,
    pub mode: ValidationMode,
    pub strict_order: bool,
    pub repair_enabled: bool,
    pub state: PassState,
    pub result: Option<ValidationResult>,
    pub started_at: DateTime,
    pub finished_at: Option<DateTime>,
    /// Where the pass continues: the lower bound of the next range (`None` = MinKey).
    pub next_lower: Option<Bson>,
    /// How often the pass was continued after a restart.
    pub resumes: u32,
    pub ranges_checked: u64,
    /// Ranges whose digests differed at first sight and were re-checked (most are writes in
    /// flight that the re-check resolves).
    pub ranges_rechecked: u64,
    /// `_id`s those re-checks looked at.
    pub documents_rechecked: u64,
    pub source_documents: u64,
    pub destination_documents: u64,
    /// Drifted documents (missing + extra + content, + order-only with `strict_order`).
    pub mismatched_documents: u64,
    pub order_only_documents: u64,
    pub unverified_documents: u64,
    pub documents_repaired: u64,
    pub mismatched_ranges: Vec<RangeFinding>,
    pub options_differ: Vec<OptionDiff>,
    /// Set when the pass could not conclude for a reason other than individual `_id`s (count
    /// mode on a busy collection, a worker that did not catch up, a copy in progress).
    pub indeterminate: bool,
    pub notes: Vec<String>,
    pub error: Option<String>,
    /// Time spent scanning, summed over resumes.
    pub elapsed: Duration,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sync_id: &str,
        namespace: &str,
        target: &str,
        collection_uuid: Option<bson::Uuid>,
        runner: Runner,
        trigger: &str,
        mode: ValidationMode,
        strict_order: bool,
        repair_enabled: bool,
    ) -> Report {
        Report {
            id: ObjectId::new(),
            sync_id: sync_id.to_string(),
            namespace: namespace.to_string(),
            target: target.to_string(),
            collection_uuid,
            runner,
            trigger: trigger.to_string(),
            mode,
            strict_order,
            repair_enabled,
            state: PassState::Running,
            result: None,
            started_at: DateTime::now(),
            finished_at: None,
            next_lower: None,
            resumes: 0,
            ranges_checked: 0,
            ranges_rechecked: 0,
            documents_rechecked: 0,
            source_documents: 0,
            destination_documents: 0,
            mismatched_documents: 0,
            order_only_documents: 0,
            unverified_documents: 0,
            documents_repaired: 0,
            mismatched_ranges: Vec::new(),
            options_differ: Vec::new(),
            indeterminate: false,
            notes: Vec::new(),
            error: None,
            elapsed: Duration::ZERO,
        }
    }

    /// Adds a range's findings to the totals; the `_id` lists of ranges beyond
    /// [`MAX_IDS_PER_REPORT`] are dropped (bounds and counts are kept).
    pub fn add_finding(&mut self, mut finding: RangeFinding) {
        self.mismatched_documents += finding.drift(self.strict_order);
        self.order_only_documents += finding.order_only.count;
        self.unverified_documents += finding.unverified.count;
        let stored: usize = self
            .mismatched_ranges
            .iter()
            .map(RangeFinding::ids_stored)
            .sum();
        if stored + finding.ids_stored() > MAX_IDS_PER_REPORT {
            for list in [
                &mut finding.missing,
                &mut finding.extra,
                &mut finding.content,
                &mut finding.order_only,
                &mut finding.unverified,
            ] {
                list.ids.clear();
            }
            if !self
                .notes
                .iter()
                .any(|n| n.starts_with("_id lists truncated"))
            {
                self.notes.push(format!(
                    "_id lists truncated: a report stores at most {MAX_IDS_PER_REPORT} _ids; counts are exact"
                ));
            }
        }
        self.mismatched_ranges.push(finding);
    }

    /// The pass's verdict.
    pub fn compute_result(&self) -> ValidationResult {
        if self.error.is_some() {
            ValidationResult::Error
        } else if self.mismatched_documents > 0 || !self.options_differ.is_empty() {
            ValidationResult::Mismatch
        } else if self.unverified_documents > 0 || self.indeterminate {
            ValidationResult::Unverified
        } else {
            ValidationResult::Match
        }
    }

    /// Source documents compared per second of scanning.
    pub fn documents_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.source_documents as f64 / secs
        } else {
            0.0
        }
    }

    pub fn to_document(&self) -> Document {
        let opt_dt = |d: Option<DateTime>| d.map(Bson::DateTime).unwrap_or(Bson::Null);
        doc! {
            "_id": self.id,
            "sync_id": self.sync_id.clone(),
            "namespace": self.namespace.clone(),
            "target": self.target.clone(),
            "collection_uuid": self.collection_uuid.map(|u| Bson::Binary(bson::Binary::from_uuid(u))).unwrap_or(Bson::Null),
            "runner": self.runner.as_str(),
            "trigger": self.trigger.clone(),
            "mode": match self.mode { ValidationMode::Hash => "hash", ValidationMode::Count => "count" },
            "strict_order": self.strict_order,
            "repair": self.repair_enabled,
            "state": self.state.as_str(),
            "result": self.result.map(|r| Bson::String(r.as_str().into())).unwrap_or(Bson::Null),
            "started_at": self.started_at,
            "finished_at": opt_dt(self.finished_at),
            "next_lower": self.next_lower.clone().unwrap_or(Bson::MinKey),
            "resumes": self.resumes as i32,
            "ranges_checked": self.ranges_checked as i64,
            "ranges_rechecked": self.ranges_rechecked as i64,
            "documents_rechecked": self.documents_rechecked as i64,
            "documents": {"source": self.source_documents as i64, "destination": self.destination_documents as i64},
            "mismatched_documents": self.mismatched_documents as i64,
            "order_only_documents": self.order_only_documents as i64,
            "unverified_documents": self.unverified_documents as i64,
            "documents_repaired": self.documents_repaired as i64,
            "mismatched_ranges": self.mismatched_ranges.iter().map(|r| Bson::Document(r.to_document())).collect::<Vec<_>>(),
            "options_differ": self.options_differ.iter().map(|o| Bson::Document(doc! {"option": o.option.clone(), "source": o.source.clone(), "destination": o.destination.clone()})).collect::<Vec<_>>(),
            "indeterminate": self.indeterminate,
            "notes": self.notes.clone(),
            "error": self.error.clone().map(Bson::String).unwrap_or(Bson::Null),
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "documents_per_second": self.documents_per_second(),
        }
    }

    pub fn from_document(d: &Document) -> Option<Report> {
        let count = |k: &str| d.get_i64(k).unwrap_or(0).max(0) as u64;
        let docs = d.get_document("documents").ok();
        Some(Report {
            id: d.get_object_id("_id").ok()?,
            sync_id: d.get_str("sync_id").ok()?.to_string(),
            namespace: d.get_str("namespace").ok()?.to_string(),
            target: d.get_str("target").unwrap_or_default().to_string(),
            collection_uuid: match d.get("collection_uuid") {
                Some(Bson::Binary(b)) => b.to_uuid().ok(),
                _ => None,
            },
            runner: if d.get_str("runner").ok() == Some("cli") {
                Runner::Cli
            } else {
                Runner::Daemon
            },
            trigger: d.get_str("trigger").unwrap_or_default().to_string(),
            mode: if d.get_str("mode").ok() == Some("count") {
                ValidationMode::Count
            } else {
                ValidationMode::Hash
            },
            strict_order: d.get_bool("strict_order").unwrap_or(false),
            repair_enabled: d.get_bool("repair").unwrap_or(false),
            state: PassState::parse(d.get_str("state").unwrap_or_default()),
            result: d.get_str("result").ok().and_then(parse_result),
            started_at: d.get_datetime("started_at").ok().copied()?,
            finished_at: d.get_datetime("finished_at").ok().copied(),
            next_lower: match d.get("next_lower") {
                None | Some(Bson::MinKey) | Some(Bson::Null) => None,
                Some(b) => Some(b.clone()),
            },
            resumes: d.get_i32("resumes").unwrap_or(0).max(0) as u32,
            ranges_checked: count("ranges_checked"),
            ranges_rechecked: count("ranges_rechecked"),
            documents_rechecked: count("documents_rechecked"),
            source_documents: docs
                .and_then(|x| x.get_i64("source").ok())
                .unwrap_or(0)
                .max(0) as u64,
            destination_documents: docs
                .and_then(|x| x.get_i64("destination").ok())
                .unwrap_or(0)
                .max(0) as u64,
            mismatched_documents: count("mismatched_documents"),
            order_only_documents: count("order_only_documents"),
            unverified_documents: count("unverified_documents"),
            documents_repaired: count("documents_repaired"),
            mismatched_ranges: d
                .get_array("mismatched_ranges")
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_document().map(RangeFinding::from_document))
                        .collect()
                })
                .unwrap_or_default(),
            options_differ: d
                .get_array("options_differ")
                .map(|a| {
                    a.iter()
                        .filter_map(|o| o.as_document())
                        .map(|o| OptionDiff {
                            option: o.get_str("option").unwrap_or_default().to_string(),
                            source: o.get("source").cloned().unwrap_or(Bson::Null),
                            destination: o.get("destination").cloned().unwrap_or(Bson::Null),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            indeterminate: d.get_bool("indeterminate").unwrap_or(false),
            notes: d
                .get_array("notes")
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            error: d.get_str("error").ok().map(str::to_string),
            elapsed: Duration::from_secs_f64(d.get_f64("elapsed_seconds").unwrap_or(0.0).max(0.0)),
        })
    }

    /// The report as JSON (`--json`): the stored document in relaxed extended JSON, so `_id`s
    /// keep their BSON types (`{"$oid": ...}`, `{"$minKey": 1}`) and plain numbers stay plain.
    pub fn to_json(&self) -> Value {
        Bson::Document(self.to_document()).into_relaxed_extjson()
    }

    /// A human-readable report: one line per namespace, one per differing range.
    pub fn render_text(&self) -> String {
        let result = self.result.unwrap_or_else(|| self.compute_result());
        let mut out = format!(
            "{} -> {}: {}  ({} mode, {} range{}, {} source / {} destination documents, {} drifted, {} unverified, {:.1}s, {:.0} docs/s)\n",
            self.namespace,
            self.target,
            result.as_str().to_uppercase(),
            match self.mode {
                ValidationMode::Hash => "hash",
                ValidationMode::Count => "count",
            },
            self.ranges_checked,
            if self.ranges_checked == 1 { "" } else { "s" },
            self.source_documents,
            self.destination_documents,
            self.mismatched_documents,
            self.unverified_documents,
            self.elapsed.as_secs_f64(),
            self.documents_per_second(),
        );
        for r in &self.mismatched_ranges {
            out.push_str(&format!(
                "  range [{}, {}):\n",
                show(r.lower.as_ref().unwrap_or(&Bson::MinKey)),
                show(r.upper.as_ref().unwrap_or(&Bson::MaxKey))
            ));
            for (name, list) in [
                ("missing on destination", &r.missing),
                ("extra on destination", &r.extra),
                ("content differs", &r.content),
                ("field order differs", &r.order_only),
                ("unverified (changing)", &r.unverified),
            ] {
                if list.is_empty() {
                    continue;
                }
                let ids: Vec<String> = list.ids.iter().take(20).map(show).collect();
                let more = if list.count as usize > ids.len() {
                    format!(", ... ({} more)", list.count as usize - ids.len())
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "    {name}: {} (_id {}{more})\n",
                    list.count,
                    ids.join(", ")
                ));
            }
            if let Some(rep) = &r.repair {
                match &rep.error {
                    Some(e) => out.push_str(&format!("    repair failed: {e}\n")),
                    None => out.push_str(&format!(
                        "    repaired: {} upserted, {} deleted; re-check: {}\n",
                        rep.upserted,
                        rep.deleted,
                        rep.after.as_str()
                    )),
                }
            }
        }
        for o in &self.options_differ {
            out.push_str(&format!(
                "  option {} differs: source {} / destination {}\n",
                o.option,
                show(&o.source),
                show(&o.destination)
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        if let Some(e) = &self.error {
            out.push_str(&format!("  error: {e}\n"));
        }
        out
    }
}

/// A BSON value as relaxed extended JSON text.
fn show(b: &Bson) -> String {
    match b {
        Bson::MinKey => "MinKey".into(),
        Bson::MaxKey => "MaxKey".into(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// Summary of several namespace reports (the `validate` command's JSON document).
pub fn summary_json(sync_id: &str, reports: &[Report], result: &str, exit_code: u8) -> Value {
    json!({
        "sync_id": sync_id,
        "result": result,
        "exit_code": exit_code,
        "namespaces": reports.iter().map(Report::to_json).collect::<Vec<_>>(),
    })
}

/// The `validations` collection.
#[derive(Clone)]
pub struct ReportStore {
    coll: Collection<Document>,
    /// Report writes, bounded by `destination.socket_timeout_ms` like every destination write.
    writes: crate::bounded_write::BoundedWrites,
}

fn store_error(context: &str, e: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::Checkpoint, context, e)
}

impl ReportStore {
    pub fn new(metadata_db: &Database, limit: Option<std::time::Duration>) -> ReportStore {
        ReportStore {
            writes: crate::bounded_write::BoundedWrites::new(
                metadata_db,
                limit,
                ErrorKind::Checkpoint,
            ),
            coll: metadata_db.collection_with_options(
                VALIDATIONS_COLLECTION,
                mongodb::options::CollectionOptions::builder()
                    .write_concern(crate::config::daemon_write_concern())
                    .read_concern(ReadConcern::majority())
                    .build(),
            ),
        }
    }

    /// Writes (inserts or replaces) a report.
    pub async fn save(&self, report: &Report) -> Result<(), SyncError> {
        self.writes
            .replace(
                VALIDATIONS_COLLECTION,
                doc! {"_id": report.id},
                report.to_document(),
                true,
                "saving a validation report",
            )
            .await?;
        Ok(())
    }

    /// The unfinished pass of `runner` over `namespace`, if any (the newest).
    pub async fn running(
        &self,
        sync_id: &str,
        namespace: &str,
        runner: Runner,
    ) -> Result<Option<Report>, SyncError> {
        let found = self
            .coll
            .find_one(doc! {"sync_id": sync_id, "namespace": namespace, "runner": runner.as_str(), "state": "running"})
            .sort(doc! {"started_at": -1})
            .await
            .map_err(|e| store_error("loading a validation pass", e))?;
        Ok(found.as_ref().and_then(Report::from_document))
    }

    /// Marks unfinished passes of `runner` over `namespace` other than `keep` as abandoned.
    pub async fn abandon_others(
        &self,
        sync_id: &str,
        namespace: &str,
        runner: Runner,
        keep: Option<ObjectId>,
    ) -> Result<(), SyncError> {
        let mut filter = doc! {"sync_id": sync_id, "namespace": namespace, "runner": runner.as_str(), "state": "running"};
        if let Some(id) = keep {
            filter.insert("_id", doc! {"$ne": id});
        }
        self.writes
            .update_many(
                VALIDATIONS_COLLECTION,
                filter,
                doc! {"$set": {"state": "abandoned", "finished_at": DateTime::now()}},
                "closing abandoned validation passes",
            )
            .await?;
        Ok(())
    }

    /// Finished reports of a namespace, newest first.
    pub async fn finished(
        &self,
        sync_id: &str,
        namespace: &str,
        limit: i64,
    ) -> Result<Vec<Report>, SyncError> {
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"sync_id": sync_id, "namespace": namespace, "state": "finished"})
            .sort(doc! {"finished_at": -1})
            .limit(limit)
            .await
            .map_err(|e| store_error("listing validation reports", e))?
            .try_collect()
            .await
            .map_err(|e| store_error("listing validation reports", e))?;
        Ok(docs.iter().filter_map(Report::from_document).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report::new(
            "default",
            "shop.orders",
            "shop.orders_copy",
            Some(bson::Uuid::new()),
            Runner::Daemon,
            "schedule",
            ValidationMode::Hash,
            false,
            true,
        );
        r.ranges_checked = 3;
        r.source_documents = 25_000;
        r.destination_documents = 24_998;
        r.next_lower = Some(Bson::Int32(20_000));
        let mut f = RangeFinding {
            lower: None,
            upper: Some(Bson::Int32(10_000)),
            ..RangeFinding::default()
        };
        f.missing.push(Bson::Int32(5));
        f.missing.push(Bson::Int32(6));
        f.content.push(Bson::String("k".into()));
        f.order_only.push(Bson::Int32(7));
        f.repair = Some(RepairFinding {
            upserted: 10_000,
            deleted: 0,
            after: ValidationResult::Match,
            error: None,
        });
        r.add_finding(f);
        r.options_differ.push(OptionDiff {
            option: "validator".into(),
            source: Bson::Document(doc! {"a": {"$exists": true}}),
            destination: Bson::Null,
        });
        r.elapsed = Duration::from_millis(1500);
        r.result = Some(r.compute_result());
        r
    }

    #[test]
    fn order_only_is_drift_only_when_strict() {
        let mut f = RangeFinding::default();
        f.order_only.push(Bson::Int32(1));
        f.content.push(Bson::Int32(2));
        f.unverified.push(Bson::Int32(3));
        assert_eq!(f.drift(false), 1);
        assert_eq!(f.drift(true), 2);
        let mut strict = Report::new(
            "default",
            "a.b",
            "a.b",
            None,
            Runner::Daemon,
            "schedule",
            ValidationMode::Hash,
            true,
            false,
        );
        let mut only_order = RangeFinding::default();
        only_order.order_only.push(Bson::Int32(1));
        strict.add_finding(only_order.clone());
        assert_eq!(strict.compute_result(), ValidationResult::Mismatch);
        let mut lenient = Report::new(
            "default",
            "a.b",
            "a.b",
            None,
            Runner::Daemon,
            "schedule",
            ValidationMode::Hash,
            false,
            false,
        );
        lenient.add_finding(only_order);
        assert_eq!(lenient.compute_result(), ValidationResult::Match);
        assert_eq!(lenient.order_only_documents, 1);
    }

    #[test]
    fn round_trips_through_bson() {
        let r = sample();
        let back = Report::from_document(&r.to_document()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn totals_and_result() {
        let r = sample();
        // order-only does not count without strict_order
        assert_eq!(r.mismatched_documents, 3);
        assert_eq!(r.order_only_documents, 1);
        assert_eq!(r.compute_result(), ValidationResult::Mismatch);
        let mut clean = Report::new(
            "default",
            "a.b",
            "a.b",
            None,
            Runner::Cli,
            "command",
            ValidationMode::Hash,
            true,
            false,
        );
        assert_eq!(clean.compute_result(), ValidationResult::Match);
        clean.indeterminate = true;
        assert_eq!(clean.compute_result(), ValidationResult::Unverified);
        clean.error = Some("x".into());
        assert_eq!(clean.compute_result(), ValidationResult::Error);
    }

    #[test]
    fn json_keeps_id_types_and_text_names_every_class() {
        let r = sample();
        let j = r.to_json();
        let range = &j["mismatched_ranges"][0];
        assert_eq!(range["lower"], json!({"$minKey": 1}));
        assert_eq!(range["upper"], json!(10_000));
        assert_eq!(range["missing"]["ids"], json!([5, 6]));
        assert_eq!(range["content"]["ids"], json!(["k"]));
        assert_eq!(j["result"], json!("mismatch"));
        let text = r.render_text();
        assert!(text.contains("MISMATCH"), "{text}");
        assert!(text.contains("range [MinKey, 10000)"), "{text}");
        assert!(
            text.contains("missing on destination: 2 (_id 5, 6)"),
            "{text}"
        );
        assert!(text.contains("field order differs: 1"), "{text}");
        assert!(text.contains("option validator differs"), "{text}");
        assert!(text.contains("re-check: match"), "{text}");
    }

    #[test]
    fn id_lists_are_capped_but_counts_exact() {
        let mut r = sample();
        let mut f = RangeFinding::default();
        for i in 0..(MAX_IDS_PER_CLASS as i32 + 10) {
            f.missing.push(Bson::Int32(i));
        }
        assert_eq!(f.missing.ids.len(), MAX_IDS_PER_CLASS);
        assert_eq!(f.missing.count, MAX_IDS_PER_CLASS as u64 + 10);
        for _ in 0..12 {
            r.add_finding(f.clone());
        }
        let stored: usize = r.mismatched_ranges.iter().map(|x| x.ids_stored()).sum();
        assert!(stored <= MAX_IDS_PER_REPORT);
        assert_eq!(
            r.mismatched_documents,
            3 + 12 * (MAX_IDS_PER_CLASS as u64 + 10)
        );
        assert!(r.notes.iter().any(|n| n.contains("truncated")));
    }
}

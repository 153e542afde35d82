//! One validation pass over one namespace (DESIGN §2.7), shared by the daemon and the
//! `validate` command.
//!
//! Hash mode walks the source's `_id` order in ranges of [`RANGE_DOCS`] documents. For each
//! range the source is digested first (which also finds where the range ends), then the same
//! `[lower, upper)` on the destination, while the source's next range is already being read.
//! Equal range digests: the range matches. Different digests: the `_id`s that differ are
//! re-checked (see [`Pass::recheck`]) so writes that were in flight never raise an alarm; what is
//! still different is drift, which is repaired through the namespace worker when
//! `validation.repair` is on.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bson::{Bson, Timestamp};
use mongodb::Client;
use tokio::sync::{mpsc, oneshot};

use super::{
    digest::{candidates, compare_documents, Difference, IdKey},
    report::{OptionDiff, RangeFinding, RepairFinding, Report, ReportStore, Runner},
    request::{RepairDone, RepairRequest, WorkerCommand},
    scan::{self, Side, FETCH_CHUNK},
    NamespacePlan, Throttles,
};
use crate::{
    checkpoint::{at_or_after, CheckpointKey, CheckpointStore, Phase},
    config::ValidationMode,
    error::SyncError,
    metrics::ValidationResult,
    source::Source,
};

/// Documents per range (the same bound as the copy's and repair's ranges).
pub const RANGE_DOCS: usize = crate::model::RANGE_MAX_DOCS;
/// Re-check rounds for `_id`s that keep changing on the source before they are reported
/// `unverified` (DESIGN §2.7: up to 3).
pub const RECHECK_ROUNDS: usize = 3;
/// How long reading the source's change stream over a re-check window may take.
const CHANGES_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a repair may wait for the worker (it runs between two of the worker's batches).
const REPAIR_TIMEOUT: Duration = Duration::from_secs(600);
/// Polling interval of the applied position.
const APPLIED_POLL: Duration = Duration::from_millis(100);
/// Collection options whose difference is reported (capped collections are created uncapped
/// on purpose, DESIGN §2.3, so `capped`/`size`/`max` are not compared).
const COMPARED_OPTIONS: &[&str] = &[
    "validator",
    "validationLevel",
    "validationAction",
    "collation",
];

/// How far a namespace's worker has applied the source, from its checkpoint.
pub struct AppliedPosition {
    store: CheckpointStore,
    key: CheckpointKey,
    /// Set once a wait timed out: later waits of the pass only look once, so a stopped daemon
    /// costs one `--wait-seconds`, not one per range.
    stalled: AtomicBool,
}

impl AppliedPosition {
    pub fn new(store: CheckpointStore, key: CheckpointKey) -> AppliedPosition {
        AppliedPosition {
            store,
            key,
            stalled: AtomicBool::new(false),
        }
    }

    /// Waits until the worker is streaming and has applied through `t` or later; `false` when
    /// `timeout` passed first.
    pub async fn wait_for(&self, t: Timestamp, timeout: Duration) -> Result<bool, SyncError> {
        let deadline = Instant::now()
            + if self.stalled.load(Ordering::Relaxed) {
                Duration::ZERO
            } else {
                timeout
            };
        loop {
            if let Some(cp) = self.store.load(&self.key).await? {
                if cp.phase == Phase::Streaming {
                    if cp.applied_through.is_some_and(|a| at_or_after(a, t)) {
                        return Ok(true);
                    }
                    // A quiet namespace on a shared stream: its stream's watermark moves.
                    let shared = self.store.applied_by_shared_stream(&self.key).await?;
                    if shared.is_some_and(|a| at_or_after(a, t)) {
                        return Ok(true);
                    }
                }
            }
            if Instant::now() >= deadline {
                self.stalled.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            tokio::time::sleep(APPLIED_POLL).await;
        }
    }
}

/// What a pass may do.
#[derive(Debug, Clone)]
pub struct PassSettings {
    pub mode: ValidationMode,
    pub strict_order: bool,
    pub repair: bool,
    /// Why `validation.repair` is not honoured for this namespace (noted when drift is found).
    pub repair_blocked: Option<String>,
    /// How long to wait for the worker to apply past a re-check time.
    pub recheck_wait: Duration,
    pub runner: Runner,
    pub trigger: String,
}

/// Everything one pass needs.
pub struct Pass<'a> {
    pub source: &'a Source,
    pub dest: &'a Client,
    /// `destination.socket_timeout_ms`.
    pub dest_timeout: Option<Duration>,
    pub sync_id: &'a str,
    pub plan: &'a NamespacePlan,
    pub settings: PassSettings,
    pub throttles: &'a Throttles,
    pub reports: &'a ReportStore,
    pub applied: AppliedPosition,
    /// The namespace worker's command channel (the daemon only): repairs go through it.
    pub worker: Option<mpsc::Sender<WorkerCommand>>,
}

/// The outcome of re-checking some `_id`s.
#[derive(Debug, Default)]
struct Verdicts {
    missing: Vec<Bson>,
    extra: Vec<Bson>,
    content: Vec<Bson>,
    order_only: Vec<Bson>,
    unverified: Vec<Bson>,
    note: Option<String>,
}

impl Verdicts {
    fn into_finding(
        self,
        lower: Option<Bson>,
        upper: Option<Bson>,
    ) -> (RangeFinding, Option<String>) {
        let mut f = RangeFinding {
            lower,
            upper,
            ..RangeFinding::default()
        };
        for (list, ids) in [
            (&mut f.missing, self.missing),
            (&mut f.extra, self.extra),
            (&mut f.content, self.content),
            (&mut f.order_only, self.order_only),
            (&mut f.unverified, self.unverified),
        ] {
            for id in ids {
                list.push(id);
            }
        }
        (f, self.note)
    }
}

impl Pass<'_> {
    fn source_side(&self) -> Side {
        Side::source(
            self.source.client(),
            &self.plan.ns,
            &self.plan.options,
            self.source.op_timeout(),
        )
    }

    fn destination_side(&self) -> Side {
        Side::destination(
            self.dest,
            &self.plan.target,
            &self.plan.options,
            self.dest_timeout,
        )
    }

    /// Runs the pass; with `resume`, continues this runner's unfinished pass of the same
    /// collection incarnation from its next range. The report is saved as it goes and when
    /// finished; it is returned either way (`result` is set once finished).
    pub async fn run(&self, resume: bool) -> Report {
        let ns = self.plan.ns.to_string();
        let mut report = match self.start(resume).await {
            Ok(r) => r,
            Err(e) => {
                let mut r = self.new_report();
                r.error = Some(e.to_string());
                r.state = super::report::PassState::Finished;
                r.result = Some(ValidationResult::Error);
                r.finished_at = Some(bson::DateTime::now());
                return r;
            }
        };
        let elapsed_before = report.elapsed;
        // The clock covers the comparison itself, not the options check before it (which
        // waits for the worker's next checkpoint).
        let mut started = Instant::now();
        let outcome = self.body(&mut report, &mut started, elapsed_before).await;
        report.elapsed = elapsed_before + started.elapsed();
        if let Err(e) = outcome {
            tracing::warn!(namespace = %ns, error = %e, "validation pass failed");
            report.error = Some(e.to_string());
        }
        report.state = super::report::PassState::Finished;
        report.finished_at = Some(bson::DateTime::now());
        report.result = Some(report.compute_result());
        if let Err(e) = self.reports.save(&report).await {
            tracing::warn!(namespace = %ns, error = %e, "could not store the validation report");
            if report.error.is_none() {
                report
                    .notes
                    .push(format!("the report could not be stored: {e}"));
            }
        }
        report
    }

    fn new_report(&self) -> Report {
        Report::new(
            self.sync_id,
            &self.plan.ns.to_string(),
            &self.plan.target.to_string(),
            self.plan.uuid,
            self.settings.runner,
            &self.settings.trigger,
            self.settings.mode,
            self.settings.strict_order,
            self.settings.repair,
        )
    }

    async fn start(&self, resume: bool) -> Result<Report, SyncError> {
        let ns = self.plan.ns.to_string();
        let runner = self.settings.runner;
        if resume {
            if let Some(mut r) = self.reports.running(self.sync_id, &ns, runner).await? {
                if r.collection_uuid == self.plan.uuid && r.mode == self.settings.mode {
                    r.resumes += 1;
                    r.strict_order = self.settings.strict_order;
                    r.repair_enabled = self.settings.repair;
                    tracing::info!(namespace = %ns, ranges_checked = r.ranges_checked, "continuing an interrupted validation pass from its last finished range");
                    self.reports
                        .abandon_others(self.sync_id, &ns, runner, Some(r.id))
                        .await?;
                    return Ok(r);
                }
            }
        }
        self.reports
            .abandon_others(self.sync_id, &ns, runner, None)
            .await?;
        let r = self.new_report();
        self.reports.save(&r).await?;
        Ok(r)
    }

    async fn body(
        &self,
        report: &mut Report,
        started: &mut Instant,
        elapsed_before: Duration,
    ) -> Result<(), SyncError> {
        let (differ, note) = self.compare_options().await?;
        report.options_differ = differ;
        report.notes.extend(note);
        *started = Instant::now();
        match self.settings.mode {
            ValidationMode::Hash => self.hash(report, *started, elapsed_before).await,
            ValidationMode::Count => self.count(report).await,
        }
    }

    /// Options of the destination collection that differ from the source's. Options change by
    /// `collMod` events, which the worker applies in order: the source is read first (then its
    /// cluster time T), the destination once the worker has applied past T, then the source
    /// again; an option that changed in between is not compared this time.
    async fn compare_options(&self) -> Result<(Vec<OptionDiff>, Option<String>), SyncError> {
        let src = self.source_side();
        let Some(before) = scan::collection_options(&src).await? else {
            return Ok((
                Vec::new(),
                Some("the source collection no longer exists".into()),
            ));
        };
        let t = self.source.cluster_time().await?;
        if !self.applied.wait_for(t, self.settings.recheck_wait).await? {
            return Ok((
                Vec::new(),
                Some("collection options not compared: the worker did not catch up".into()),
            ));
        }
        let Some(dest) = scan::collection_options(&self.destination_side()).await? else {
            return Ok((
                vec![OptionDiff {
                    option: "collection".into(),
                    source: Bson::String("exists".into()),
                    destination: Bson::String("missing".into()),
                }],
                None,
            ));
        };
        let after = scan::collection_options(&src).await?.unwrap_or_default();
        let mut out = Vec::new();
        for key in COMPARED_OPTIONS {
            let (s, d) = (after.get(*key), dest.get(*key));
            if s != before.get(*key) {
                continue;
            }
            if s != d {
                out.push(OptionDiff {
                    option: (*key).to_string(),
                    source: s.cloned().unwrap_or(Bson::Null),
                    destination: d.cloned().unwrap_or(Bson::Null),
                });
            }
        }
        Ok((out, None))
    }

    /// Hash mode: every range, pipelined (the destination side of range *i* is read while
    /// the source side of range *i + 1* is).
    async fn hash(
        &self,
        report: &mut Report,
        started: Instant,
        elapsed_before: Duration,
    ) -> Result<(), SyncError> {
        let (src, dst) = (self.source_side(), self.destination_side());
        let mut lower = report.next_lower.clone();
        let mut current = scan::digest_source(
            &src,
            lower.as_ref(),
            None,
            RANGE_DOCS,
            &self.throttles.source,
        )
        .await?;
        loop {
            let upper = current.next.clone();
            let (dest_docs, next) = match &upper {
                Some(u) => {
                    let (d, n) = tokio::join!(
                        scan::digest_destination(
                            &dst,
                            lower.as_ref(),
                            Some(u),
                            &self.throttles.destination
                        ),
                        scan::digest_source(
                            &src,
                            Some(u),
                            None,
                            RANGE_DOCS,
                            &self.throttles.source
                        )
                    );
                    (d?, Some(n?))
                }
                None => (
                    scan::digest_destination(
                        &dst,
                        lower.as_ref(),
                        None,
                        &self.throttles.destination,
                    )
                    .await?,
                    None,
                ),
            };
            report.ranges_checked += 1;
            report.source_documents += current.docs.digest.count;
            report.destination_documents += dest_docs.digest.count;
            if current.docs.digest != dest_docs.digest {
                let differing = candidates(&current.docs, &dest_docs);
                let read_at = match current.read_at {
                    Some(t) => t,
                    None => self.source.cluster_time().await?,
                };
                let ids = differing.all();
                report.ranges_rechecked += 1;
                report.documents_rechecked += ids.len() as u64;
                // Free the range's digests before the re-check reads documents.
                drop(current.docs);
                let (finding, note) = self
                    .examine(lower.clone(), upper.clone(), ids, read_at)
                    .await?;
                if let Some(n) = note {
                    if !report.notes.contains(&n) {
                        report.notes.push(n);
                    }
                }
                report.documents_repaired += repaired_count(&finding, self.settings.strict_order);
                if !finding.is_empty() {
                    report.add_finding(finding);
                }
            }
            let Some(next) = next else {
                // The last range: the finished report records it.
                return Ok(());
            };
            report.next_lower = upper.clone();
            report.elapsed = elapsed_before + started.elapsed();
            // Progress: a restart continues after this range.
            self.reports.save(report).await?;
            lower = upper;
            current = next;
        }
    }

    /// A range whose digests differ: re-check the differing `_id`s, then repair the range if
    /// they drifted and repair is on.
    async fn examine(
        &self,
        lower: Option<Bson>,
        upper: Option<Bson>,
        ids: Vec<Bson>,
        read_at: Timestamp,
    ) -> Result<(RangeFinding, Option<String>), SyncError> {
        let ns = self.plan.ns.to_string();
        let (mut finding, note) = self
            .recheck(ids, read_at)
            .await?
            .into_finding(lower.clone(), upper.clone());
        if let Some(n) = &note {
            tracing::info!(namespace = %ns, note = %n, "re-check could not conclude");
        }
        let drift = finding.drift(self.settings.strict_order);
        if drift == 0 {
            return Ok((finding, note));
        }
        // _id values stay out of logs (they may be personal data); the report has them.
        tracing::warn!(
            namespace = %ns,
            missing = finding.missing.count,
            extra = finding.extra.count,
            content = finding.content.count,
            order_only = finding.order_only.count,
            "drift found in an _id range; the _ids are in the validation report"
        );
        if !self.settings.repair {
            return Ok((
                finding,
                note.or_else(|| self.settings.repair_blocked.clone()),
            ));
        }
        finding.repair = Some(match self.repair(lower.clone(), upper.clone()).await {
            Ok(done) => {
                let after = self.check_range(lower.clone(), upper.clone()).await?;
                let after_result = if after.drift(self.settings.strict_order) > 0 {
                    ValidationResult::Mismatch
                } else if after.is_empty() {
                    ValidationResult::Match
                } else {
                    ValidationResult::Unverified
                };
                tracing::info!(namespace = %ns, upserted = done.upserted, deleted = done.deleted, after = %after_result, "range repaired through the worker");
                RepairFinding {
                    upserted: done.upserted,
                    deleted: done.deleted,
                    after: after_result,
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, error = %e, "range repair failed");
                RepairFinding {
                    upserted: 0,
                    deleted: 0,
                    after: ValidationResult::Error,
                    error: Some(e),
                }
            }
        });
        Ok((finding, note))
    }

    /// Digests `[lower, upper)` on both sides again and re-checks what differs.
    async fn check_range(
        &self,
        lower: Option<Bson>,
        upper: Option<Bson>,
    ) -> Result<RangeFinding, SyncError> {
        let (src, dst) = (self.source_side(), self.destination_side());
        // A bounded re-read: `upper = None` (MaxKey) still needs the whole tail, so read it with
        // an explicit bound of MaxKey.
        let bound = upper.clone().unwrap_or(Bson::MaxKey);
        let (s, d) = tokio::join!(
            scan::digest_source(
                &src,
                lower.as_ref(),
                Some(&bound),
                RANGE_DOCS,
                &self.throttles.source
            ),
            scan::digest_destination(
                &dst,
                lower.as_ref(),
                Some(&bound),
                &self.throttles.destination
            )
        );
        let (s, d) = (s?, d?);
        if s.docs.digest == d.digest {
            return Ok(RangeFinding {
                lower,
                upper,
                ..RangeFinding::default()
            });
        }
        let read_at = match s.read_at {
            Some(t) => t,
            None => self.source.cluster_time().await?,
        };
        let ids = candidates(&s.docs, &d).all();
        Ok(self
            .recheck(ids, read_at)
            .await?
            .into_finding(lower, upper)
            .0)
    }

    /// DESIGN §2.7. Once the worker has applied past `t`, the destination documents are read,
    /// then the source documents (at cluster time T2), then the source's change stream over
    /// `[t, T2]`: an `_id` without events there has had the same source state since before
    /// `t`, which the destination (having applied everything up to `t`) must hold — if it does
    /// not, that is drift. `_id`s with events are re-checked in the next round with `t = T2`;
    /// after [`RECHECK_ROUNDS`] rounds they are `unverified`, never `match`.
    async fn recheck(&self, ids: Vec<Bson>, read_at: Timestamp) -> Result<Verdicts, SyncError> {
        let (src, dst) = (self.source_side(), self.destination_side());
        let mut out = Verdicts::default();
        let mut pending = ids;
        let mut t = read_at;
        for _round in 0..RECHECK_ROUNDS {
            if pending.is_empty() {
                break;
            }
            if !self.applied.wait_for(t, self.settings.recheck_wait).await? {
                out.note = Some(format!(
                    "the worker did not apply past the re-check time within {}s",
                    self.settings.recheck_wait.as_secs()
                ));
                break;
            }
            let mut verdicts: Vec<(Bson, Difference, bool, bool)> =
                Vec::with_capacity(pending.len());
            let mut t2: Option<Timestamp> = None;
            for chunk in pending.chunks(FETCH_CHUNK) {
                let (dest_docs, _) = scan::fetch(&dst, chunk).await?;
                let (source_docs, at) = scan::fetch(&src, chunk).await?;
                t2 = match (t2, at) {
                    (Some(a), Some(b)) if at_or_after(a, b) => Some(a),
                    (_, Some(b)) => Some(b),
                    (a, None) => a,
                };
                for id in chunk {
                    let key = IdKey::of_bson(id);
                    let (s, d) = (source_docs.get(&key), dest_docs.get(&key));
                    let diff = match (s, d) {
                        (Some(a), Some(b)) => compare_documents(a, b),
                        (None, None) => Difference::Equal,
                        _ => Difference::Content,
                    };
                    verdicts.push((id.clone(), diff, s.is_some(), d.is_some()));
                }
            }
            let t2 = match t2 {
                Some(t2) => t2,
                None => self.source.cluster_time().await?,
            };
            let changes = match scan::changes_between(
                self.source.client(),
                &self.plan.ns,
                Some(&pending),
                t,
                t2,
                CHANGES_TIMEOUT,
            )
            .await
            {
                Ok(c) if !c.collection_changed => c,
                Ok(_) => {
                    out.note = Some("the collection was dropped or renamed on the source".into());
                    break;
                }
                Err(e) => {
                    out.note = Some(format!("cannot read the source's changes: {e}"));
                    break;
                }
            };
            let mut busy = Vec::new();
            for (id, diff, on_source, on_dest) in verdicts {
                if changes.ids.contains(&IdKey::of_bson(&id)) {
                    busy.push(id);
                    continue;
                }
                match (diff, on_source, on_dest) {
                    (Difference::Equal, _, _) => {}
                    (_, true, false) => out.missing.push(id),
                    (_, false, true) => out.extra.push(id),
                    (Difference::OrderOnly, _, _) => out.order_only.push(id),
                    _ => out.content.push(id),
                }
            }
            pending = busy;
            t = t2;
        }
        out.unverified = pending;
        Ok(out)
    }

    /// Asks the namespace worker to re-copy `[lower, upper)` (DESIGN §2.8).
    async fn repair(&self, lower: Option<Bson>, upper: Option<Bson>) -> Result<RepairDone, String> {
        let Some(worker) = &self.worker else {
            return Err("repairs run in the daemon, through the namespace worker".into());
        };
        let (reply, answer) = oneshot::channel();
        worker
            .send(WorkerCommand::RepairRange(Box::new(RepairRequest {
                lower,
                upper,
                reply,
            })))
            .await
            .map_err(|_| "the namespace worker has stopped".to_string())?;
        match tokio::time::timeout(REPAIR_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the worker dropped the repair (it restarted or was parked)".into()),
            Err(_) => Err(format!(
                "the worker did not repair the range within {}s",
                REPAIR_TIMEOUT.as_secs()
            )),
        }
    }

    /// Count mode: counts on both sides, trusted only if the collection was quiet while they
    /// were taken (no source events between the source count and the end of the destination
    /// count, and the worker had applied through the source count).
    async fn count(&self, report: &mut Report) -> Result<(), SyncError> {
        let (src, dst) = (self.source_side(), self.destination_side());
        let source = self.source;
        report.ranges_checked = 1;
        for _attempt in 0..RECHECK_ROUNDS {
            let (n_src, at) = scan::count(&src).await?;
            let t1 = match at {
                Some(t) => t,
                None => source.cluster_time().await?,
            };
            if !self
                .applied
                .wait_for(t1, self.settings.recheck_wait)
                .await?
            {
                report.indeterminate = true;
                report.notes.push(format!(
                    "the worker did not apply past the count within {}s",
                    self.settings.recheck_wait.as_secs()
                ));
                return Ok(());
            }
            let (n_dst, _) = scan::count(&dst).await?;
            let t2 = source.cluster_time().await?;
            let changes = scan::changes_between(
                self.source.client(),
                &self.plan.ns,
                None,
                t1,
                t2,
                CHANGES_TIMEOUT,
            )
            .await?;
            if changes.any {
                continue;
            }
            report.source_documents = n_src;
            report.destination_documents = n_dst;
            report.mismatched_documents = n_src.abs_diff(n_dst);
            if n_src != n_dst {
                tracing::warn!(namespace = %self.plan.ns, source = n_src, destination = n_dst, "document counts differ");
            }
            return Ok(());
        }
        report.indeterminate = true;
        report.notes.push(format!(
            "count mode: the collection was never quiet during {RECHECK_ROUNDS} attempts; counts are not comparable under writes"
        ));
        Ok(())
    }
}

/// Drifted documents of a range that its repair fixed.
fn repaired_count(finding: &RangeFinding, strict_order: bool) -> u64 {
    match &finding.repair {
        Some(r) if r.error.is_none() && r.after == ValidationResult::Match => {
            finding.drift(strict_order)
        }
        _ => 0,
    }
}

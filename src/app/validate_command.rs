//! `mongo-syncd validate --config FILE [--json] [--wait-seconds N]`: one pass over every
//! in-scope namespace, using the daemon's checkpoints to know how far the destination has
//! applied the source. It only reports (repairs go through the daemon's workers) and exits
//! 0 in sync, 1 drift found, 3 indeterminate, 4 could not run (DESIGN §2.7).

use std::io::Write;

use bson::doc;
use mongodb::Client;

use crate::{
    checkpoint::{CheckpointKey, CheckpointStore, Phase},
    cli::ValidateOptions,
    config::Config,
    error::{policy, ErrorKind, RetryDirective, SyncError},
    exit,
    metrics::ValidationResult,
    source::{Namespace, Source},
    validate::{
        pass::{AppliedPosition, Pass, PassSettings},
        report::{summary_json, Report, ReportStore, Runner},
        NamespacePlan, Throttles,
    },
};

/// The exit code for a set of namespace results: drift wins (it is a finding), then a pass
/// that could not run, then an indeterminate one.
pub fn exit_code(results: &[ValidationResult]) -> u8 {
    if results.contains(&ValidationResult::Mismatch) {
        exit::validate::DRIFT
    } else if results.contains(&ValidationResult::Error) {
        exit::validate::COULD_NOT_RUN
    } else if results.contains(&ValidationResult::Unverified) {
        exit::validate::UNVERIFIED
    } else {
        exit::validate::IN_SYNC
    }
}

fn could_not_run(e: &SyncError) -> u8 {
    match policy(e) {
        RetryDirective::Fatal { exit_code } => exit_code,
        _ => exit::validate::COULD_NOT_RUN,
    }
}

async fn ping(client: &Client, area: ErrorKind, what: &str) -> Result<(), SyncError> {
    client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .map(|_| ())
        .map_err(|e| SyncError::mongo(area, format!("reaching the {what}"), e))
}

/// Runs the command; returns the exit code.
pub async fn run(config: Config, options: ValidateOptions, clients: (Client, Client)) -> u8 {
    let (source, dest) = clients;
    match validate_all(&config, &options, &source, &dest).await {
        Ok(reports) => {
            let results: Vec<ValidationResult> = reports
                .iter()
                .map(|r| r.result.unwrap_or(ValidationResult::Error))
                .collect();
            let code = exit_code(&results);
            let verdict = match code {
                exit::validate::IN_SYNC => "match",
                exit::validate::DRIFT => "mismatch",
                exit::validate::UNVERIFIED => "unverified",
                _ => "error",
            };
            let mut out = std::io::stdout().lock();
            let written = if options.json {
                writeln!(
                    out,
                    "{}",
                    summary_json(&config.sync.id, &reports, verdict, code)
                )
            } else {
                let mut text = format!(
                    "mongo-syncd validate: sync.id {:?}, {} namespace{}\n",
                    config.sync.id,
                    reports.len(),
                    if reports.len() == 1 { "" } else { "s" }
                );
                for r in &reports {
                    text.push_str(&r.render_text());
                }
                text.push_str(&format!(
                    "result: {} (exit {code})\n",
                    match code {
                        exit::validate::IN_SYNC => "in sync",
                        exit::validate::DRIFT => "drift found",
                        exit::validate::UNVERIFIED =>
                            "indeterminate: some documents could not be verified",
                        _ => "some namespaces could not be validated",
                    }
                ));
                write!(out, "{text}")
            };
            if written.and_then(|()| out.flush()).is_err() {
                return exit::validate::COULD_NOT_RUN;
            }
            code
        }
        Err(e) => {
            tracing::error!(error = %e, "validation could not run");
            if options.json {
                let code = could_not_run(&e);
                println!(
                    "{}",
                    serde_json::json!({"sync_id": config.sync.id, "result": "error", "exit_code": code, "error": e.to_string(), "namespaces": []})
                );
            }
            could_not_run(&e)
        }
    }
}

async fn validate_all(
    config: &Config,
    options: &ValidateOptions,
    source: &Client,
    dest: &Client,
) -> Result<Vec<Report>, SyncError> {
    let connect = options.wait.max(std::time::Duration::from_secs(10));
    for (client, area, what) in [
        (source, ErrorKind::SourceConnection, "source"),
        (dest, ErrorKind::DestinationConnection, "destination"),
    ] {
        match tokio::time::timeout(connect, ping(client, area, what)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(SyncError::new(
                    area,
                    format!("the {what} did not answer within {}s", connect.as_secs()),
                ))
            }
        }
    }
    let metadata_db = dest.database(&config.checkpoint.database);
    let checkpoints = CheckpointStore::new(&metadata_db, config.destination.socket_timeout());
    let reports = ReportStore::new(&metadata_db, config.destination.socket_timeout());
    let known = checkpoints.list(&config.sync.id).await?;
    if known.is_empty() {
        return Err(SyncError::new(
            ErrorKind::Checkpoint,
            format!(
                "no checkpoints of sync.id {:?} in {}.checkpoints: the daemon has not synced anything to this destination yet",
                config.sync.id, config.checkpoint.database
            ),
        ));
    }
    let source = Source::new(source.clone(), config.source.socket_timeout());
    let (collections, _skipped) = source.list_collections().await?;
    let filter = config.namespace_filter();
    let throttles = Throttles::new(config.validation.max_docs_per_second);
    let mut out = Vec::new();
    for coll in collections {
        if !filter.matches(&coll.ns.db, &coll.ns.coll) {
            continue;
        }
        let (tdb, tcoll) = config.rename_map().target(&coll.ns.db, &coll.ns.coll);
        let plan = NamespacePlan {
            target: Namespace::new(tdb, tcoll),
            ns: coll.ns.clone(),
            uuid: coll.uuid,
            options: coll.options.clone(),
        };
        let label = plan.ns.to_string();
        let checkpoint = known
            .iter()
            .find(|(k, _)| k.ns == label && k.uuid == plan.uuid)
            .map(|(_, cp)| cp);
        let not_ready = match checkpoint {
            None => Some("the daemon has no checkpoint for this collection yet"),
            Some(cp) if cp.phase == Phase::Copying => Some("the initial copy is still running"),
            Some(_) => None,
        };
        if let Some(reason) = not_ready {
            let mut r = Report::new(
                &config.sync.id,
                &label,
                &plan.target.to_string(),
                plan.uuid,
                Runner::Cli,
                "command",
                config.validation.mode,
                config.validation.strict_order,
                false,
            );
            r.indeterminate = true;
            r.notes.push(reason.to_string());
            r.state = crate::validate::report::PassState::Finished;
            r.finished_at = Some(bson::DateTime::now());
            r.result = Some(r.compute_result());
            if let Err(e) = reports.save(&r).await {
                tracing::warn!(namespace = %label, error = %e, "could not store the validation report");
            }
            out.push(r);
            continue;
        }
        let pass = Pass {
            source: &source,
            dest,
            dest_timeout: config.destination.socket_timeout(),
            sync_id: &config.sync.id,
            plan: &plan,
            settings: PassSettings {
                mode: config.validation.mode,
                strict_order: config.validation.strict_order,
                repair: false,
                repair_blocked: None,
                recheck_wait: options.wait,
                runner: Runner::Cli,
                trigger: "command".into(),
            },
            throttles: &throttles,
            reports: &reports,
            applied: AppliedPosition::new(
                checkpoints.clone(),
                CheckpointKey {
                    sync_id: config.sync.id.clone(),
                    ns: label.clone(),
                    uuid: plan.uuid,
                },
            ),
            worker: None,
        };
        let mut report = pass.run(false).await;
        if config.validation.repair && report.mismatched_documents > 0 {
            report.notes.push(
                "validation.repair is on: the daemon repairs drift through its workers; this command only reports".into(),
            );
        }
        out.push(report);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_outranks_errors_which_outrank_unverified() {
        use ValidationResult::*;
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(exit_code(&[Match, Match]), 0);
        assert_eq!(exit_code(&[Match, Unverified]), 3);
        assert_eq!(exit_code(&[Unverified, Error]), 4);
        assert_eq!(exit_code(&[Error, Mismatch, Unverified]), 1);
    }
}

//! Replica-set state as clients see it: `replSetStepDown`, the primary gate of writes and
//! reads, and awaitable `hello` (the streaming monitoring protocol).
//!
//! MongoDB 4.2+ behaviour (manual, "replSetStepDown"; SERVER-38511/38512): a step-down kills
//! writes in progress with 11602 InterruptedDueToReplStateChange but keeps connections open;
//! reads in progress and open cursors continue (`getMore` works on the secondary); new writes
//! get 10107 NotWritablePrimary and primary-only reads 13435 NotPrimaryNoSecondaryOk; a
//! connection whose fire-and-forget write (`moreToCome`) failed so is closed, since the
//! client cannot see the error. A single-member set steps down only with `force: true`.

use std::time::Duration;

use bson::{doc, Bson, Document};

use super::Ctx;
use crate::error::{codes, CommandError, CommandResult};

/// Commands that write (refused on a secondary).
const WRITE_COMMANDS: &[&str] = &[
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
    "bulkWrite",
    "create",
    "drop",
    "dropDatabase",
    "renameCollection",
    "collMod",
    "createIndexes",
    "dropIndexes",
    "deleteIndexes",
    "commitTransaction",
];

/// Reads that need a primary unless the read preference allows secondaries.
const READ_COMMANDS: &[&str] = &[
    "find",
    "aggregate",
    "count",
    "distinct",
    "listCollections",
    "listIndexes",
    "dbHash",
    "dbhash",
    "collStats",
    "dbStats",
];

/// Whether the command carries a read preference other than `primary`.
fn secondary_ok(cmd: &Document) -> bool {
    cmd.get_document("$readPreference")
        .ok()
        .and_then(|rp| rp.get_str("mode").ok())
        .is_some_and(|m| m != "primary")
}

fn writes(ctx: &Ctx<'_>) -> bool {
    if WRITE_COMMANDS.contains(&ctx.name.as_str()) {
        return true;
    }
    // `aggregate` with `$out`/`$merge` writes too.
    ctx.name == "aggregate"
        && ctx.cmd.get_array("pipeline").is_ok_and(|p| {
            p.iter().any(|s| {
                s.as_document()
                    .is_some_and(|s| s.contains_key("$out") || s.contains_key("$merge"))
            })
        })
}

/// Refuses what a non-primary refuses; fails writes that were held up (fail point
/// `blockConnection`) across a step-down with 11602, as the step-down kill thread does.
pub fn gate(ctx: &Ctx<'_>) -> CommandResult<()> {
    let (primary, counter) = {
        let repl = ctx.engine.repl.lock();
        (repl.is_primary(), repl.topology_counter)
    };
    if writes(ctx) {
        if counter != ctx.repl_counter_at_start {
            return Err(CommandError::new(
                codes::INTERRUPTED_DUE_TO_REPL_STATE_CHANGE,
                "operation was interrupted because of a replica set state change",
            ));
        }
        if !primary {
            return Err(CommandError::new(
                codes::NOT_WRITABLE_PRIMARY,
                "not primary",
            ));
        }
    } else if !primary
        && READ_COMMANDS.contains(&ctx.name.as_str())
        && !secondary_ok(ctx.cmd)
        && !ctx.in_transaction()
    {
        return Err(CommandError::new(
            codes::NOT_PRIMARY_NO_SECONDARY_OK,
            "not primary and secondaryOk=false",
        ));
    }
    Ok(())
}

/// `replSetStepDown: <secs>, secondaryCatchUpPeriodSecs, force`.
pub fn step_down(ctx: &Ctx<'_>) -> CommandResult<Document> {
    if ctx.db != "admin" {
        return Err(CommandError::new(
            codes::UNAUTHORIZED,
            "replSetStepDown may only be run against the admin database.",
        ));
    }
    let secs = |k: &str, default: f64| -> CommandResult<f64> {
        match ctx.cmd.get(k) {
            None => Ok(default),
            Some(Bson::Int32(v)) => Ok(*v as f64),
            Some(Bson::Int64(v)) => Ok(*v as f64),
            Some(Bson::Double(v)) => Ok(*v),
            Some(_) if k == "replSetStepDown" => Ok(60.0),
            Some(_) => Err(CommandError::type_mismatch(format!(
                "'{k}' must be a number"
            ))),
        }
    };
    let step_down_secs = secs("replSetStepDown", 60.0)?;
    let catch_up_secs = secs("secondaryCatchUpPeriodSecs", 10.0)?;
    for (k, _) in ctx.cmd {
        if !matches!(
            k.as_str(),
            "replSetStepDown" | "secondaryCatchUpPeriodSecs" | "force"
        ) && !k.starts_with('$')
            && !super::ddl::is_generic_argument(k)
        {
            return Err(CommandError::new(
                codes::LOCATION_40415_UNKNOWN_FIELD,
                format!("BSON field 'replSetStepDown.{k}' is an unknown field."),
            ));
        }
    }
    if step_down_secs < catch_up_secs {
        return Err(CommandError::new(
            codes::BAD_VALUE,
            "stepdown period must be longer than secondaryCatchUpPeriodSecs",
        ));
    }
    if !ctx.engine.is_primary() {
        return Err(CommandError::new(
            codes::NOT_WRITABLE_PRIMARY,
            "not primary",
        ));
    }
    if !ctx.cmd.get_bool("force").unwrap_or(false) {
        // A single-member set has no electable secondary to wait for.
        return Err(CommandError::new(
            codes::EXCEEDED_TIME_LIMIT,
            "No electable secondaries caught up as of now. Please use the replSetStepDown command with the argument {force: true} to force node to step down.",
        ));
    }
    let for_ = Duration::from_secs_f64(step_down_secs.max(0.0));
    if !ctx.engine.step_down(for_) {
        return Err(CommandError::new(
            codes::NOT_WRITABLE_PRIMARY,
            "not primary",
        ));
    }
    Ok(Document::new())
}

/// Awaitable `hello`: with `topologyVersion` equal to the current one and `maxAwaitTimeMS`,
/// answers when the replica-set state changes or the time is up.
pub async fn await_topology_change(ctx: &Ctx<'_>) {
    let (Ok(tv), Some(max)) = (
        ctx.cmd.get_document("topologyVersion"),
        super::int_arg(ctx.cmd, "maxAwaitTimeMS").ok().flatten(),
    ) else {
        return;
    };
    let mut watch = ctx.engine.repl_watch.subscribe();
    let (process_id, counter) = {
        let repl = ctx.engine.repl.lock();
        (*ctx.engine.process_id.lock(), repl.topology_counter)
    };
    let same = tv.get_object_id("processId").ok() == Some(process_id)
        && tv.get("counter").and_then(crate::store::as_i64) == Some(counter);
    if !same {
        return;
    }
    let wait = Duration::from_millis(max.clamp(0, 60_000) as u64);
    let _ = tokio::time::timeout(wait, watch.changed()).await;
}

/// `topologyVersion` of this process.
pub fn topology_version(ctx_engine: &crate::engine::Engine) -> Document {
    let counter = ctx_engine.repl.lock().topology_counter;
    doc! {"processId": *ctx_engine.process_id.lock(), "counter": counter}
}

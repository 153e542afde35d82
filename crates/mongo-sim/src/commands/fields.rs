//! Strict command parsing (MongoDB 7.0 IDL rules): every field of a command is either a generic
//! argument, one of the command's own fields, or an error. Unknown fields fail with 40415
//! (`BSON field 'find.bogus' is an unknown field.`) as the server's strict IDL parsers do;
//! fields MongoDB accepts but the simulator does not implement fail with 115
//! CommandNotSupported naming the feature, never silently ignored.
//!
//! Commands without an entry here (`create`, `collMod`, `serverStatus`, `getParameter`, the
//! SASL conversation) check their own arguments where they are parsed; the `hello` handshake is
//! not checked (drivers add handshake fields across versions, e.g. `backpressure`).

use bson::{Bson, Document};

use crate::{
    error::{codes, CommandError, CommandResult},
    store::Collection,
};

/// Arguments every command accepts (`src/mongo/idl/generic_argument.idl`, 7.0).
const GENERIC: &[&str] = &[
    "apiVersion",
    "apiStrict",
    "apiDeprecationErrors",
    "$db",
    "maxTimeMS",
    "readConcern",
    "writeConcern",
    "lsid",
    "clientOperationKey",
    "txnNumber",
    "autocommit",
    "startTransaction",
    "stmtId",
    "comment",
    "$readPreference",
    "$clusterTime",
    "$audit",
    "$client",
    "$configServerState",
    "allowImplicitCollectionCreation",
    "$oplogQueryData",
    "$queryOptions",
    "$replData",
    "databaseVersion",
    "shardVersion",
    "tracking_info",
    "coordinator",
    "maxTimeMSOpOnly",
    "$configTime",
    "$topologyTime",
    "txnRetryCounter",
    "mayBypassWriteBlocking",
    "$tenant",
    "expectPrefix",
];

/// How the simulator treats one known field.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Implemented.
    Yes,
    /// Accepted when false/0/null (the server's default); otherwise the named feature is
    /// not implemented.
    IfFalsy(&'static str),
    /// Never implemented.
    No(&'static str),
    /// `collation`: checked as a collation document (`crate::collation`).
    Collation,
}

use Rule::{Collation, IfFalsy, No, Yes};

type Fields = &'static [(&'static str, Rule)];

const FIND: Fields = &[
    ("filter", Yes),
    ("projection", Yes),
    ("sort", Yes),
    ("hint", Yes),
    ("collation", Collation),
    ("skip", Yes),
    ("limit", Yes),
    ("batchSize", Yes),
    ("singleBatch", Yes),
    ("min", Yes),
    ("max", Yes),
    ("let", Yes),
    // The simulator has no memory limit on sorts and never times cursors out: both options
    // hold whatever their value.
    ("allowDiskUse", Yes),
    ("noCursorTimeout", Yes),
    // Sharding only: no shard can be unavailable on a replica set.
    ("allowPartialResults", Yes),
    // Ignored by the server since 4.4.
    ("oplogReplay", Yes),
    ("returnKey", IfFalsy("returnKey")),
    ("showRecordId", IfFalsy("showRecordId")),
    ("tailable", IfFalsy("tailable cursors")),
    ("awaitData", IfFalsy("tailable cursors (awaitData)")),
    ("ntoreturn", No("ntoreturn")),
    ("options", No("legacy query options")),
    ("term", No("the internal 'term' field")),
    ("readOnce", IfFalsy("readOnce")),
    (
        "allowSpeculativeMajorityRead",
        IfFalsy("speculative majority reads"),
    ),
    ("$_requestResumeToken", IfFalsy("resumable scans")),
    ("$_resumeAfter", No("resumable scans")),
    ("runtimeConstants", No("runtimeConstants")),
    ("collectionUUID", No("collectionUUID")),
];

const GET_MORE: Fields = &[
    ("collection", Yes),
    ("batchSize", Yes),
    ("term", No("the internal 'term' field")),
    ("lastKnownCommittedOpTime", No("lastKnownCommittedOpTime")),
];

const AGGREGATE: Fields = &[
    ("pipeline", Yes),
    ("cursor", Yes),
    ("allowDiskUse", Yes),
    ("bypassDocumentValidation", Yes),
    ("collation", Collation),
    ("hint", Yes),
    ("let", Yes),
    ("explain", IfFalsy("explain")),
    ("needsMerge", IfFalsy("sharded merging")),
    ("fromMongos", IfFalsy("sharded merging")),
    ("fromRouter", IfFalsy("sharded merging")),
    ("$_requestReshardingResumeToken", IfFalsy("resharding")),
    ("isMapReduceCommand", IfFalsy("mapReduce")),
    ("collectionUUID", No("collectionUUID")),
    ("exchange", No("exchange")),
    ("runtimeConstants", No("runtimeConstants")),
    ("$_generateV2ResumeTokens", IfFalsy("v2 resume tokens")),
    ("encryptionInformation", No("queryable encryption")),
];

const COUNT: Fields = &[
    ("query", Yes),
    ("limit", Yes),
    ("skip", Yes),
    ("hint", Yes),
    ("collation", Collation),
    // Deprecated and ignored by the server.
    ("fields", Yes),
    ("sampleId", No("query sampling")),
    ("mirrored", IfFalsy("mirrored reads")),
    ("encryptionInformation", No("queryable encryption")),
];

const DISTINCT: Fields = &[
    ("key", Yes),
    ("query", Yes),
    ("collation", Collation),
    ("sampleId", No("query sampling")),
    ("mirrored", IfFalsy("mirrored reads")),
];

const INSERT: Fields = &[
    ("documents", Yes),
    ("ordered", Yes),
    ("bypassDocumentValidation", Yes),
    ("stmtIds", No("stmtIds")),
    ("collectionUUID", No("collectionUUID")),
    ("encryptionInformation", No("queryable encryption")),
    ("isTimeseriesNamespace", IfFalsy("time-series collections")),
];

const UPDATE: Fields = &[
    ("updates", Yes),
    ("ordered", Yes),
    ("bypassDocumentValidation", Yes),
    ("let", Yes),
    ("stmtIds", No("stmtIds")),
    ("collectionUUID", No("collectionUUID")),
    ("encryptionInformation", No("queryable encryption")),
    ("isTimeseriesNamespace", IfFalsy("time-series collections")),
];

/// An update statement (`UpdateOpEntry`, 7.0: no `sort`, added in 8.0).
const UPDATE_STATEMENT: Fields = &[
    ("q", Yes),
    ("u", Yes),
    ("c", Yes),
    ("arrayFilters", Yes),
    ("hint", Yes),
    ("multi", Yes),
    ("upsert", Yes),
    ("collation", Collation),
    ("upsertSupplied", IfFalsy("upsertSupplied")),
    ("sampleId", No("query sampling")),
    (
        "$_allowShardKeyUpdatesWithoutFullShardKeyInQuery",
        IfFalsy("sharding"),
    ),
];

const DELETE: Fields = &[
    ("deletes", Yes),
    ("ordered", Yes),
    ("let", Yes),
    ("stmtIds", No("stmtIds")),
    ("collectionUUID", No("collectionUUID")),
    ("encryptionInformation", No("queryable encryption")),
    ("isTimeseriesNamespace", IfFalsy("time-series collections")),
];

const DELETE_STATEMENT: Fields = &[
    ("q", Yes),
    ("limit", Yes),
    ("hint", Yes),
    ("collation", Collation),
    ("sampleId", No("query sampling")),
];

const FIND_AND_MODIFY: Fields = &[
    ("query", Yes),
    ("fields", Yes),
    ("sort", Yes),
    ("hint", Yes),
    ("collation", Collation),
    ("arrayFilters", Yes),
    ("remove", Yes),
    ("update", Yes),
    ("new", Yes),
    ("upsert", Yes),
    ("bypassDocumentValidation", Yes),
    ("let", Yes),
    ("runtimeConstants", No("runtimeConstants")),
    ("encryptionInformation", No("queryable encryption")),
    ("sampleId", No("query sampling")),
    (
        "$_allowShardKeyUpdatesWithoutFullShardKeyInQuery",
        IfFalsy("sharding"),
    ),
];

const LIST_COLLECTIONS: Fields = &[
    ("filter", Yes),
    ("nameOnly", Yes),
    // Every user is root in the simulator: all collections are authorized.
    ("authorizedCollections", Yes),
    ("cursor", Yes),
    ("includePendingDrops", IfFalsy("includePendingDrops")),
];

const LIST_INDEXES: Fields = &[
    ("cursor", Yes),
    ("includeBuildUUIDs", IfFalsy("includeBuildUUIDs")),
    ("includeIndexBuildInfo", IfFalsy("includeIndexBuildInfo")),
];

const LIST_DATABASES: Fields = &[
    ("filter", Yes),
    ("nameOnly", Yes),
    ("authorizedDatabases", Yes),
];

const RENAME: Fields = &[
    ("to", Yes),
    ("dropTarget", Yes),
    ("stayTemp", IfFalsy("temporary collections")),
    ("collectionUUID", No("collectionUUID")),
];

const CREATE_INDEXES: Fields = &[
    ("indexes", Yes),
    // One voting member: every commit quorum is satisfied by it.
    ("commitQuorum", Yes),
    (
        "ignoreUnknownIndexOptions",
        IfFalsy("ignoreUnknownIndexOptions"),
    ),
    ("isTimeseriesNamespace", IfFalsy("time-series collections")),
    ("collectionUUID", No("collectionUUID")),
];

const DROP_INDEXES: Fields = &[
    ("index", Yes),
    ("isTimeseriesNamespace", IfFalsy("time-series collections")),
    ("collectionUUID", No("collectionUUID")),
];

const NONE: Fields = &[];

/// The fields of the commands the simulator checks strictly, and the name the server uses
/// in its messages.
fn command_fields(name: &str) -> Option<(&'static str, Fields)> {
    Some(match name {
        "find" => ("find", FIND),
        "getMore" => ("getMore", GET_MORE),
        "aggregate" => ("aggregate", AGGREGATE),
        "count" => ("count", COUNT),
        "distinct" => ("distinct", DISTINCT),
        "insert" => ("insert", INSERT),
        "update" => ("update", UPDATE),
        "delete" => ("delete", DELETE),
        "findAndModify" | "findandmodify" => ("findAndModify", FIND_AND_MODIFY),
        "killCursors" => ("killCursors", &[("cursors", Yes)]),
        "listCollections" => ("listCollections", LIST_COLLECTIONS),
        "listIndexes" => ("listIndexes", LIST_INDEXES),
        "listDatabases" => ("listDatabases", LIST_DATABASES),
        "dbHash" | "dbhash" => ("dbHash", &[("collections", Yes)]),
        "collStats" => (
            "collStats",
            &[("scale", Yes), ("verbose", IfFalsy("verbose collStats"))],
        ),
        "dbStats" => (
            "dbStats",
            &[("scale", Yes), ("freeStorage", IfFalsy("freeStorage"))],
        ),
        "drop" => ("drop", &[("collectionUUID", No("collectionUUID"))]),
        "dropDatabase" => ("dropDatabase", NONE),
        "renameCollection" => ("renameCollection", RENAME),
        "createIndexes" => ("createIndexes", CREATE_INDEXES),
        "dropIndexes" | "deleteIndexes" => ("dropIndexes", DROP_INDEXES),
        "commitTransaction" => ("commitTransaction", &[("recoveryToken", Yes)]),
        "abortTransaction" => ("abortTransaction", &[("recoveryToken", Yes)]),
        "endSessions" | "killSessions" | "killAllSessions" | "ping" | "buildInfo" | "buildinfo"
        | "hostInfo" | "getCmdLineOpts" | "whatsmyuri" => ("", NONE),
        "connectionStatus" => (
            "connectionStatus",
            &[("showPrivileges", IfFalsy("showPrivileges"))],
        ),
        "replSetGetConfig" => (
            "replSetGetConfig",
            &[
                ("commitmentStatus", IfFalsy("commitmentStatus")),
                (
                    "includeNewlyAddedMembers",
                    IfFalsy("includeNewlyAddedMembers"),
                ),
            ],
        ),
        "replSetGetStatus" => (
            "replSetGetStatus",
            &[("initialSync", IfFalsy("initialSync details"))],
        ),
        "configureFailPoint" => ("configureFailPoint", &[("mode", Yes), ("data", Yes)]),
        _ => return None,
    })
}

pub fn unknown_field(path: &str) -> CommandError {
    CommandError::new(
        codes::LOCATION_40415_UNKNOWN_FIELD,
        format!("BSON field '{path}' is an unknown field."),
    )
}

/// The error for a field MongoDB accepts and the simulator does not implement.
pub fn not_supported(path: &str, feature: &str) -> CommandError {
    CommandError::new(
        codes::COMMAND_NOT_SUPPORTED,
        format!("mongo-sim does not implement {feature} (field '{path}')"),
    )
}

fn is_falsy(v: &Bson) -> bool {
    match v {
        Bson::Null | Bson::Undefined => true,
        Bson::Boolean(b) => !b,
        Bson::Int32(n) => *n == 0,
        Bson::Int64(n) => *n == 0,
        Bson::Double(n) => *n == 0.0,
        _ => false,
    }
}

/// `collation`: parsed and checked as the server does (`crate::collation::parse`); an empty
/// document counts as absent.
pub fn check_collation(path: &str, v: &Bson) -> CommandResult<()> {
    crate::collation::parse_arg(path, v).map(|_| ())
}

fn type_name(v: &Bson) -> &'static str {
    match v {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Boolean(_) => "bool",
        Bson::Null => "null",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        _ => "other",
    }
}

/// Checks `doc`'s fields (after the first `skip` ones) against `fields`.
fn check_fields(
    prefix: &str,
    doc: &Document,
    skip: usize,
    fields: Fields,
    generic: bool,
) -> CommandResult<()> {
    for (k, v) in doc.iter().skip(skip) {
        if generic && GENERIC.contains(&k.as_str()) {
            continue;
        }
        // The path is only formatted when a message needs it (every statement of a large
        // batch passes through here).
        let path = || format!("{prefix}.{k}");
        let Some((_, rule)) = fields.iter().find(|(name, _)| *name == k.as_str()) else {
            return Err(unknown_field(&path()));
        };
        match rule {
            Yes => {}
            IfFalsy(feature) if !is_falsy(v) => return Err(not_supported(&path(), feature)),
            IfFalsy(_) => {}
            No(feature) => return Err(not_supported(&path(), feature)),
            Collation => check_collation(&path(), v)?,
        }
    }
    Ok(())
}

fn check_statements(cmd: &Document, prefix: &str, key: &str, fields: Fields) -> CommandResult<()> {
    if let Ok(stmts) = cmd.get_array(key) {
        check_statement_fields(stmts, prefix, key, fields)?;
    }
    Ok(())
}

/// Rejects unknown and unimplemented fields of the statements of a write command (`updates`
/// of `update`, `deletes` of `delete`).
fn check_statement_fields(
    stmts: &[Bson],
    prefix: &str,
    key: &str,
    fields: Fields,
) -> CommandResult<()> {
    let prefix = format!("{prefix}.{key}");
    for s in stmts {
        if let Bson::Document(s) = s {
            check_fields(&prefix, s, 0, fields, false)?;
        }
    }
    Ok(())
}

/// [`check_command`]'s checks of `update`'s statements when they were moved out of the
/// command (see [`super::Ctx::documents`]).
pub fn check_update_statements(stmts: &[Bson]) -> CommandResult<()> {
    check_statement_fields(stmts, "update", "updates", UPDATE_STATEMENT)
}

/// [`check_update_statements`] of statements kept raw: a statement whose fields all pass
/// whatever their value (the usual `q`, `u`, `upsert`, `multi`) is not converted to be checked.
pub fn check_raw_update_statements(batch: &crate::wire::RawBatch) -> CommandResult<()> {
    for i in 0..batch.len() {
        // A replacement by `_id` has only `q`, `u`, `upsert` and `multi`.
        let plain = batch.is_replace_by_id(i)
            || batch.get(i).into_iter().all(|element| {
                element.is_ok_and(|(key, _)| {
                    UPDATE_STATEMENT
                        .iter()
                        .any(|(name, rule)| *name == key.as_str() && matches!(rule, Yes))
                })
            });
        if !plain {
            check_fields(
                "update.updates",
                &batch.statement(i),
                0,
                UPDATE_STATEMENT,
                false,
            )?;
        }
    }
    Ok(())
}

/// Rejects unknown and unimplemented fields of `cmd` (whose first key is `name`).
pub fn check_command(name: &str, cmd: &Document) -> CommandResult<()> {
    let Some((display, fields)) = command_fields(name) else {
        return Ok(());
    };
    let display = if display.is_empty() { name } else { display };
    check_fields(display, cmd, 1, fields, true)?;
    check_read_concern(cmd)?;
    match name {
        "update" => check_statements(cmd, display, "updates", UPDATE_STATEMENT)?,
        "delete" => check_statements(cmd, display, "deletes", DELETE_STATEMENT)?,
        "aggregate" | "listCollections" | "listIndexes" => {
            if let Some(cursor) = cmd.get("cursor") {
                let Bson::Document(cursor) = cursor else {
                    return Err(CommandError::type_mismatch(format!(
                        "BSON field '{display}.cursor' is the wrong type '{}', expected type 'object'",
                        type_name(cursor)
                    )));
                };
                check_fields(
                    &format!("{display}.cursor"),
                    cursor,
                    0,
                    &[("batchSize", Yes)],
                    false,
                )?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `readConcern`: the levels MongoDB knows; `afterClusterTime` is always satisfied by the
/// single node; `atClusterTime` is checked as `ReadConcernArgs` does (a Timestamp, only with
/// level `snapshot`, not with `afterClusterTime`, not null); its time is checked against the
/// clock and the history when the read runs (see [`crate::snapshot`]).
fn check_read_concern(cmd: &Document) -> CommandResult<()> {
    let Some(rc) = cmd.get("readConcern") else {
        return Ok(());
    };
    let Bson::Document(rc) = rc else {
        return Err(CommandError::failed_to_parse(
            "readConcern must be an object",
        ));
    };
    for (k, v) in rc {
        match k.as_str() {
            "level" => match v.as_str() {
                Some("local" | "majority" | "linearizable" | "available" | "snapshot") => {}
                _ => {
                    return Err(CommandError::failed_to_parse(format!(
                        "BSON field 'readConcern.level' has an invalid value: {v}"
                    )))
                }
            },
            "afterClusterTime" | "provenance" => {}
            "atClusterTime" => {
                if !matches!(v, Bson::Timestamp(_)) {
                    return Err(CommandError::type_mismatch(format!(
                        "BSON field 'readConcern.atClusterTime' is the wrong type '{}', expected type 'timestamp'",
                        type_name(v)
                    )));
                }
            }
            "afterOpTime" => return Err(not_supported("readConcern.afterOpTime", "afterOpTime")),
            other => return Err(unknown_field(&format!("readConcern.{other}"))),
        }
    }
    if let Some(Bson::Timestamp(at)) = rc.get("atClusterTime") {
        let invalid = |m: &str| Err(CommandError::new(codes::INVALID_OPTIONS, m.to_string()));
        if rc.contains_key("afterClusterTime") {
            return invalid("Can not specify both afterClusterTime and atClusterTime");
        }
        if rc.get_str("level").ok() != Some("snapshot") {
            return invalid("atClusterTime field can be set only if level is equal to snapshot");
        }
        if at.time == 0 && at.increment == 0 {
            return invalid("atClusterTime cannot be a null timestamp");
        }
    }
    Ok(())
}

/// Whether `field` is one of the generic arguments every command accepts.
pub fn is_generic_argument(field: &str) -> bool {
    GENERIC.contains(&field)
}

/// `readConcern.atClusterTime`, if given.
pub fn read_concern_at_cluster_time(cmd: &Document) -> Option<bson::Timestamp> {
    match cmd.get_document("readConcern").ok()?.get("atClusterTime") {
        Some(Bson::Timestamp(ts)) => Some(*ts),
        _ => None,
    }
}

/// The `readConcern` level a command asked for, if any.
pub fn read_concern_level(cmd: &Document) -> Option<&str> {
    cmd.get_document("readConcern")
        .ok()
        .and_then(|rc| rc.get_str("level").ok())
}

/// `hint`: an index name or key pattern of an existing index, or `{$natural: ±1}`. Like the
/// server, a hint on a collection that does not exist is not checked (the plan is EOF).
pub fn check_hint(coll: Option<&Collection>, hint: Option<&Bson>) -> CommandResult<()> {
    let (Some(coll), Some(hint)) = (coll, hint) else {
        return Ok(());
    };
    let bad = || {
        CommandError::bad_value(
            "error processing query: planner returned error :: caused by :: hint provided does not correspond to an existing index",
        )
    };
    match hint {
        Bson::String(name) if name.is_empty() => Ok(()),
        Bson::String(name) => {
            if coll.indexes.iter().any(|i| &i.name == name) {
                Ok(())
            } else {
                Err(bad())
            }
        }
        Bson::Document(d) if d.is_empty() => Ok(()),
        Bson::Document(d) if d.len() == 1 && d.contains_key("$natural") => Ok(()),
        Bson::Document(d) => {
            if coll.indexes.iter().any(|i| same_key_pattern(&i.key, d)) {
                Ok(())
            } else {
                Err(bad())
            }
        }
        other => Err(CommandError::failed_to_parse(format!(
            "hint must be a string or an object, not {}",
            type_name(other)
        ))),
    }
}

/// Key patterns compare like the server's BSON comparison: `{a: 1}` and `{a: 1.0}` are one.
fn same_key_pattern(a: &Document, b: &Document) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((ka, va), (kb, vb))| {
            ka == kb && crate::query::compare::compare_values(va, vb).is_eq()
        })
}

/// `$changeStream` options (`DocumentSourceChangeStreamSpec`, 7.0).
const CHANGE_STREAM: Fields = &[
    ("resumeAfter", Yes),
    ("startAfter", Yes),
    ("startAtOperationTime", Yes),
    ("fullDocument", Yes),
    ("fullDocumentBeforeChange", Yes),
    ("allChangesForCluster", Yes),
    ("showExpandedEvents", Yes),
    // A replica set has no chunk migrations: there is nothing to show either way.
    ("showMigrationEvents", Yes),
    ("showSystemEvents", IfFalsy("showSystemEvents")),
    (
        "allowToRunOnConfigDB",
        IfFalsy("change streams on the config database"),
    ),
    (
        "allowToRunOnSystemNS",
        IfFalsy("change streams on system collections"),
    ),
    (
        "showRawUpdateDescription",
        IfFalsy("showRawUpdateDescription"),
    ),
    ("$_generateV2ResumeTokens", IfFalsy("v2 resume tokens")),
];

pub fn check_change_stream_spec(spec: &Document) -> CommandResult<()> {
    check_fields("$changeStream", spec, 0, CHANGE_STREAM, false)
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;

    #[test]
    fn unknown_and_unsupported_fields() {
        let e = check_command("find", &doc! {"find": "c", "bogus": 1}).unwrap_err();
        assert_eq!(e.code, 40415);
        assert_eq!(e.message, "BSON field 'find.bogus' is an unknown field.");
        assert!(check_command(
            "find",
            &doc! {"find": "c", "filter": {}, "$db": "x", "lsid": {}, "tailable": false}
        )
        .is_ok());
        assert_eq!(
            check_command("find", &doc! {"find": "c", "tailable": true})
                .unwrap_err()
                .code,
            115
        );
        let e = check_command(
            "update",
            &doc! {"update": "c", "updates": [{"q": {}, "u": {}, "sort": {"a": 1}}]},
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "BSON field 'update.updates.sort' is an unknown field."
        );
        assert!(check_command(
            "find",
            &doc! {"find": "c", "collation": {"locale": "simple"}}
        )
        .is_ok());
        assert!(check_command("find", &doc! {"find": "c", "collation": {"locale": "fr"}}).is_ok());
        assert_eq!(
            check_command("find", &doc! {"find": "c", "collation": {"locale": "xx"}})
                .unwrap_err()
                .code,
            2
        );
        assert_eq!(
            check_command(
                "aggregate",
                &doc! {"aggregate": "c", "pipeline": [], "cursor": {"bogus": 1}}
            )
            .unwrap_err()
            .message,
            "BSON field 'aggregate.cursor.bogus' is an unknown field."
        );
        assert!(check_command("serverStatus", &doc! {"serverStatus": 1, "repl": 0}).is_ok());
    }
}

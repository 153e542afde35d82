//! Handshake and administrative commands.

use std::sync::Arc;

use bson::{doc, oid::ObjectId, Bson, Document};

use super::{ConnInfo, Ctx};
use crate::{
    engine::{lsid_key, Engine},
    error::{codes, CommandError, CommandResult},
    session,
};

pub const SERVER_VERSION: &str = "7.0.14";

/// The body of a `hello`/`isMaster` reply for a writable replica-set primary.
pub fn hello_body(
    engine: &Arc<Engine>,
    conn: &ConnInfo,
    cmd: &Document,
    is_hello: bool,
) -> Document {
    let host = engine.host.lock().clone();
    let ts = engine.cluster_time();
    let now = bson::DateTime::now();
    let (primary, term) = {
        let repl = engine.repl.lock();
        (repl.is_primary(), repl.term)
    };
    let mut d = Document::new();
    if cmd.get_bool("helloOk").unwrap_or(false) {
        d.insert("helloOk", true);
    }
    d.insert("hosts", vec![host.clone()]);
    d.insert("setName", engine.config.replica_set.clone());
    d.insert("setVersion", 1);
    d.insert(
        if is_hello {
            "isWritablePrimary"
        } else {
            "ismaster"
        },
        primary,
    );
    d.insert("secondary", !primary);
    if primary {
        d.insert("primary", host.clone());
    }
    d.insert("me", host);
    if primary {
        // Real servers: `7fffffff` + the term as 16 hex digits; a new term, a new electionId.
        d.insert("electionId", election_id(term));
    }
    d.insert(
        "lastWrite",
        doc! {
            "opTime": {"ts": ts, "t": term}, "lastWriteDate": now,
            "majorityOpTime": {"ts": ts, "t": term}, "majorityWriteDate": now,
        },
    );
    d.insert("topologyVersion", super::topology_version(engine));
    d.insert("maxBsonObjectSize", 16 * 1024 * 1024);
    d.insert("maxMessageSizeBytes", crate::wire::MAX_MESSAGE_SIZE as i32);
    d.insert("maxWriteBatchSize", 100_000);
    d.insert("localTime", now);
    d.insert("logicalSessionTimeoutMinutes", 30);
    d.insert("connectionId", conn.id);
    d.insert("minWireVersion", 0);
    d.insert("maxWireVersion", engine.config.max_wire_version);
    d.insert("readOnly", false);
    if let (Some(cred), Ok(asked)) = (&engine.config.auth, cmd.get_str("saslSupportedMechs")) {
        if asked.split_once('.') == Some(("admin", cred.user.as_str())) {
            d.insert("saslSupportedMechs", vec![crate::auth::MECHANISM]);
        }
    }
    d
}

pub fn election_id(term: i64) -> ObjectId {
    ObjectId::parse_str(format!("7fffffff{term:016x}")).expect("24 hex digits")
}

/// A complete hello reply (for the OP_QUERY handshake path).
pub fn hello_reply(
    engine: &Arc<Engine>,
    conn: &ConnInfo,
    cmd: &Document,
    is_hello: bool,
) -> Document {
    super::finish_reply(engine, hello_body(engine, conn, cmd, is_hello))
}

pub fn build_info() -> Document {
    doc! {
        "version": SERVER_VERSION,
        "gitVersion": "mongo-sim",
        "versionArray": [7, 0, 14, 0],
        "bits": 64,
        "debug": false,
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "storageEngines": ["inMemory"],
        "modules": [],
        "openssl": {"running": "disabled"},
    }
}

pub fn server_status(engine: &Arc<Engine>) -> Document {
    let (oplog_len, cursors) = (engine.data.lock().oplog.len(), engine.cursors.lock().open());
    doc! {
        "host": engine.host.lock().clone(),
        "version": SERVER_VERSION,
        "process": "mongod",
        "pid": std::process::id() as i64,
        "uptime": 1.0,
        "localTime": bson::DateTime::now(),
        "repl": {"setName": engine.config.replica_set.clone(), "isWritablePrimary": engine.is_primary(), "secondary": !engine.is_primary()},
        "metrics": {"cursor": {"open": {"total": cursors as i64}}},
        "oplog": {"entries": oplog_len as i64, "maxEntries": engine.config.oplog_max_events as i64},
        "storageEngine": {"name": "inMemory"},
        "opcounters": engine.opcounters.to_document(),
        "connections": engine.connections_document(),
    }
}

pub fn host_info() -> Document {
    doc! {"system": {"hostname": "mongo-sim", "numCores": 2}, "os": {"type": "Linux"}}
}

pub fn get_parameter(engine: &Engine, cmd: &Document) -> CommandResult<Document> {
    let (window, txn_lifetime) = {
        let data = engine.data.lock();
        (data.history.window_secs, data.sessions.txn_lifetime_secs)
    };
    let all = doc! {
        "minSnapshotHistoryWindowInSeconds": window as i32,
        "featureCompatibilityVersion": {"version": "7.0"},
        "enableTestCommands": true,
        "transactionLifetimeLimitSeconds": txn_lifetime as i32,
        "requireApiVersion": false,
        "authenticationMechanisms": ["SCRAM-SHA-256"],
    };
    match cmd.get("getParameter") {
        Some(Bson::String(s)) if s == "*" => Ok(all),
        _ => {
            let mut out = Document::new();
            for (k, _) in cmd.iter().skip(1) {
                if let Some(v) = all.get(k) {
                    out.insert(k.clone(), v.clone());
                }
            }
            Ok(out)
        }
    }
}

/// `setParameter` on `admin`: `minSnapshotHistoryWindowInSeconds` only (reply `was`: the
/// previous value); every other parameter → 115 (the simulator has no such knob).
pub fn set_parameter(ctx: &super::Ctx<'_>) -> CommandResult<Document> {
    if ctx.db != "admin" {
        return Err(CommandError::new(
            codes::UNAUTHORIZED,
            "setParameter may only be run against the admin database.",
        ));
    }
    let mut reply = Document::new();
    let mut any = false;
    for (k, v) in ctx.cmd.iter().skip(1) {
        if super::fields::is_generic_argument(k) {
            continue;
        }
        // MongoDB: the history window may be 0; a transaction lifetime must be at least 1 s.
        let least = match k.as_str() {
            "minSnapshotHistoryWindowInSeconds" => 0,
            "transactionLifetimeLimitSeconds" => 1,
            _ => {
                return Err(CommandError::new(
                    codes::COMMAND_NOT_SUPPORTED,
                    format!("setParameter '{k}' is not supported by the simulator"),
                ))
            }
        };
        let secs = crate::store::as_i64(v)
            .filter(|n| *n >= least && *n <= i32::MAX as i64)
            .ok_or_else(|| {
                CommandError::bad_value(format!(
                    "Invalid value for {k}: {v} (an integer of at least {least})"
                ))
            })?;
        let mut data = ctx.engine.data.lock();
        let setting = if k == "transactionLifetimeLimitSeconds" {
            &mut data.sessions.txn_lifetime_secs
        } else {
            &mut data.history.window_secs
        };
        reply.insert("was", *setting as i32);
        *setting = secs as u64;
        any = true;
    }
    if !any {
        return Err(CommandError::new(
            codes::INVALID_OPTIONS,
            "no option found to set, use help:true to see options ",
        ));
    }
    Ok(reply)
}

pub fn repl_set_get_config(engine: &Arc<Engine>) -> CommandResult<Document> {
    let host = engine.host.lock().clone();
    Ok(doc! {
        "config": {
            "_id": engine.config.replica_set.clone(),
            "version": 1,
            "term": engine.repl.lock().term,
            "members": [{"_id": 0, "host": host, "arbiterOnly": false, "hidden": false, "priority": 1.0, "votes": 1}],
            "protocolVersion": 1i64,
            "writeConcernMajorityJournalDefault": true,
            "settings": {"replicaSetId": engine.replica_set_id},
        }
    })
}

pub fn repl_set_get_status(engine: &Arc<Engine>) -> Document {
    let host = engine.host.lock().clone();
    let ts = engine.cluster_time();
    let (primary, term) = {
        let repl = engine.repl.lock();
        (repl.is_primary(), repl.term)
    };
    let (state, state_str) = if primary {
        (1, "PRIMARY")
    } else {
        (2, "SECONDARY")
    };
    doc! {
        "set": engine.config.replica_set.clone(),
        "date": bson::DateTime::now(),
        "myState": state,
        "term": term,
        "optimes": {"lastCommittedOpTime": {"ts": ts, "t": term}, "appliedOpTime": {"ts": ts, "t": term}},
        "members": [{"_id": 0, "name": host, "health": 1.0, "state": state, "stateStr": state_str, "self": true}],
    }
}

pub fn end_sessions(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ids = ctx
        .cmd
        .get_array("endSessions")
        .cloned()
        .unwrap_or_default();
    let mut data = ctx.engine.data.lock();
    for id in ids {
        if let Bson::Document(lsid) = id {
            data.sessions.end(&lsid_key(&lsid));
        }
    }
    Ok(Document::new())
}

pub fn kill_all_sessions(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let keys: Vec<Vec<u8>> = {
        let mut data = ctx.engine.data.lock();
        let keys = data.sessions.map.keys().cloned().collect();
        data.sessions.map.clear();
        keys
    };
    let mut cursors = ctx.engine.cursors.lock();
    for k in keys {
        cursors.kill_session(&k);
    }
    Ok(Document::new())
}

pub fn configure_fail_point(ctx: &Ctx<'_>) -> CommandResult<Document> {
    if ctx.db != "admin" {
        return Err(CommandError::new(
            codes::UNAUTHORIZED,
            "configureFailPoint may only be run against the admin database.",
        ));
    }
    let count = ctx.engine.failpoints.lock().configure(ctx.cmd)?;
    Ok(doc! {"count": count})
}

fn txn_args(ctx: &Ctx<'_>) -> CommandResult<(Vec<u8>, Document, i64)> {
    let s = ctx.session.as_ref().ok_or_else(|| {
        CommandError::new(
            codes::INVALID_OPTIONS,
            "commitTransaction must be run within a session",
        )
    })?;
    let n = s.txn_number.ok_or_else(|| {
        CommandError::new(
            codes::INVALID_OPTIONS,
            "commitTransaction must be run within a transaction",
        )
    })?;
    Ok((s.key.clone(), s.lsid.clone(), n))
}

pub fn commit_transaction(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let (key, lsid, n) = txn_args(ctx)?;
    let last = {
        let mut data = ctx.engine.data.lock();
        session::commit(&mut data, &key, &lsid, n)?;
        data.oplog.last_seq()
    };
    ctx.engine.notify_oplog(last);
    Ok(Document::new())
}

pub fn abort_transaction(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let (key, lsid, n) = txn_args(ctx)?;
    session::abort(&mut ctx.engine.data.lock(), &key, &lsid, n)?;
    Ok(Document::new())
}

//! Command dispatch: session arguments, fail points, error labels, `$clusterTime` and
//! `operationTime` on every reply.

mod admin;
mod crud;
mod ddl;
pub(crate) mod fields;
mod lets;
mod read;
mod repl;
mod write_stages;

use std::sync::Arc;

use bson::{doc, Bson, Document, Timestamp};

use crate::{
    engine::{lsid_key, Data, DirectSink, Engine, TxnSink, WriteSink},
    error::{code_name, codes, is_network_code, is_retriable_code, CommandError, CommandResult},
    failpoint::{Action, FAIL_COMMAND},
    session::{self, RetryCheck, TRANSIENT_TRANSACTION_ERROR},
    store::Catalog,
};

pub use admin::hello_reply;
pub use repl::topology_version;

/// What a connection knows about itself.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub id: i32,
    pub app_name: Option<String>,
    pub auth: crate::auth::ConnAuth,
}

/// What the connection should do with the outcome of a command.
pub enum Outcome {
    Reply(Document),
    /// A reply whose field `key` (top-level, or `outer.inner`) is the array `array`, already
    /// encoded as BSON (the `upserted` entries of an `update`, a change stream's batch):
    /// `body`'s own value of that field is a placeholder. [`Outcome::into_reply`] gives the
    /// complete document.
    ReplyWithArray {
        body: Document,
        key: &'static str,
        array: Vec<u8>,
    },
    /// `failCommand` with `closeConnection`: drop the socket without answering.
    Close,
}

impl Outcome {
    /// The reply as one document (`None`: close the connection).
    pub fn into_reply(self) -> Option<Document> {
        match self {
            Outcome::Reply(body) => Some(body),
            Outcome::ReplyWithArray {
                mut body,
                key,
                array,
            } => {
                crate::store::set_value_at_path(
                    &mut body,
                    key,
                    crate::wire::array_from_bytes(&array),
                );
                Some(body)
            }
            Outcome::Close => None,
        }
    }
}

/// Session-related arguments of a command.
#[derive(Debug, Clone)]
pub struct SessionArgs {
    pub key: Vec<u8>,
    pub lsid: Document,
    pub txn_number: Option<i64>,
    pub autocommit: Option<bool>,
    pub start_transaction: bool,
    /// `readConcern.level` of the command (a transaction takes it from its first statement).
    pub read_concern_level: Option<String>,
    /// `readConcern.atClusterTime` of the command (likewise).
    pub at_cluster_time: Option<Timestamp>,
}

impl SessionArgs {
    fn in_transaction(&self) -> bool {
        self.txn_number.is_some() && self.autocommit == Some(false)
    }
}

/// Everything a command handler needs.
/// Installs the collation a command on `ns` runs under (its `collation` argument, else the
/// collection's default) for the rest of the caller's synchronous body.
pub fn install_collation(
    ctx: &Ctx<'_>,
    ns: Option<&crate::store::Namespace>,
) -> CommandResult<crate::collation::Installed> {
    enum Default {
        Collection(Option<Arc<crate::collation::Collation>>),
        View(Option<Arc<crate::collation::Collation>>),
    }
    let default = match ns {
        Some(ns) => ctx.read(|cat, _| {
            Ok(match crate::views::lookup(cat, ns) {
                Some(view) => Default::View(view.collator()?),
                None => Default::Collection(cat.get(ns).and_then(|c| c.collation.clone())),
            })
        })?,
        None => Default::Collection(None),
    };
    let effective = match default {
        Default::Collection(default) => {
            crate::collation::effective(ctx.cmd.get("collation"), default.as_ref())?
        }
        // A read on a view runs under the view's collation; another one is refused
        // (`collatorsMatch` of find/aggregate/count/distinct, 7.0).
        Default::View(view) => {
            let explicit = match ctx.cmd.get("collation") {
                Some(v) => crate::collation::parse_arg("collation", v)?,
                None => None,
            };
            if let Some(explicit) = explicit {
                let doc = |c: &Option<Arc<crate::collation::Collation>>| {
                    c.as_ref().map(|c| c.to_document())
                };
                if doc(&explicit) != doc(&view) {
                    return Err(CommandError::new(
                        codes::OPTION_NOT_SUPPORTED_ON_VIEW,
                        "Cannot override a view's default collation",
                    ));
                }
            }
            view
        }
    };
    Ok(crate::collation::install(effective))
}

pub struct Ctx<'a> {
    pub engine: &'a Arc<Engine>,
    pub conn: &'a ConnInfo,
    pub db: String,
    pub name: String,
    pub cmd: &'a Document,
    pub session: Option<SessionArgs>,
    /// Set by `onPrimaryTransactionalWrite`: close the connection instead of replying.
    pub close_after_reply: std::sync::atomic::AtomicBool,
    /// `insert`'s `documents` or `update`'s `updates` (when an array), moved out of the
    /// command so the documents they carry are stored without a copy.
    pub documents: parking_lot::Mutex<Option<Vec<Bson>>>,
    /// `update`'s statements as received, when the wire decoding kept them raw (the command
    /// then has no `updates` field).
    pub raw_updates: parking_lot::Mutex<Option<crate::wire::RawBatch>>,
    /// `topologyVersion.counter` when the command arrived (a write held up across a
    /// step-down fails with 11602).
    pub repl_counter_at_start: i64,
    /// The time a snapshot read outside a transaction read at (replies report it as
    /// `atClusterTime`).
    pub snapshot_read_at: parking_lot::Mutex<Option<Timestamp>>,
    /// This command already opened its transaction (`startTransaction`): a command that reads
    /// the catalog more than once (e.g. for the collation, then for the documents) opens it once.
    pub transaction_begun: std::sync::atomic::AtomicBool,
    /// A field of the reply encoded apart by the command (its name and the BSON bytes of its
    /// array value; the reply holds a placeholder): see [`Outcome::ReplyWithArray`].
    pub encoded_array: parking_lot::Mutex<Option<(&'static str, Vec<u8>)>>,
}

/// Commands that take `readConcern: {level: "snapshot"}` outside transactions (MongoDB 5.0+;
/// the others answer 72, see [`Ctx::read`]).
const SNAPSHOT_READ_COMMANDS: &[&str] = &["find", "aggregate", "distinct"];

const RETRYABLE_WRITE_COMMANDS: &[&str] = &[
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
];

/// Commands allowed inside a multi-document transaction.
const TRANSACTION_COMMANDS: &[&str] = &[
    "find",
    "getMore",
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
    "aggregate",
    "distinct",
    "commitTransaction",
    "abortTransaction",
    "killCursors",
    "create",
    "createIndexes",
    "bulkWrite",
];

impl<'a> Ctx<'a> {
    pub fn in_transaction(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(SessionArgs::in_transaction)
    }

    /// Runs `f` with write access: on the shared catalog (one oplog entry per write) or, in a
    /// transaction, on its private copy (entries logged at commit).
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut Catalog, &mut dyn WriteSink) -> CommandResult<R>,
    ) -> CommandResult<R> {
        let mut guard = self.engine.data.lock();
        let data: &mut Data = &mut guard;
        let result = if let Some(s) = self.session.as_ref().filter(|s| s.in_transaction()) {
            let txn_number = self.begin_or_continue_transaction(data, s)?;
            let now = data.clock.current();
            let (first_new, r) = {
                let state = data
                    .sessions
                    .map
                    .get_mut(&s.key)
                    .expect("session created by begin");
                let t = state.txn.as_mut().expect("transaction opened by begin");
                let first_new = t.ops.len();
                let mut sink = TxnSink {
                    ops: &mut t.ops,
                    now,
                };
                (first_new, f(&mut t.catalog, &mut sink))
            };
            match r {
                Ok(v) => {
                    session::check_statement_conflicts(data, &s.key, first_new)?;
                    Ok(v)
                }
                Err(e) => {
                    // Any error inside a transaction aborts it, like on a real server.
                    let _ = session::abort(data, &s.key, &s.lsid, txn_number);
                    Err(e)
                }
            }
        } else {
            let Data {
                catalog,
                oplog,
                clock,
                ..
            } = data;
            let mut sink = DirectSink { oplog, clock };
            f(catalog, &mut sink)
        };
        let last = guard.oplog.last_seq();
        drop(guard);
        self.engine.notify_oplog(last);
        result
    }

    /// Aborts this command's transaction (a statement failed, or answered write errors).
    pub fn abort_transaction_after_error(&self) {
        if let Some(s) = self.session.as_ref().filter(|s| s.in_transaction()) {
            let txn_number = s.txn_number.expect("in_transaction checked it");
            session::abort_after_error(&mut self.engine.data.lock(), &s.key, txn_number);
        }
    }

    /// In a transaction: its read concern level and whether `ns` existed before it started
    /// (`None` outside transactions).
    pub fn transaction_view(&self, ns: &crate::store::Namespace) -> Option<(Option<String>, bool)> {
        let s = self.session.as_ref().filter(|s| s.in_transaction())?;
        let data = self.engine.data.lock();
        let t = data.sessions.map.get(&s.key)?.txn.as_ref()?;
        if Some(t.txn_number) != s.txn_number {
            // The command starts the transaction: its own read concern, today's catalog.
            return Some((s.read_concern_level.clone(), data.catalog.get(ns).is_some()));
        }
        Some((t.read_concern_level.clone(), t.base.get(ns).is_some()))
    }

    /// Opens the command's transaction on its first catalog access (`startTransaction`: a
    /// command that reads the catalog before writing must not start it twice) or continues
    /// the open one; returns its number.
    fn begin_or_continue_transaction(
        &self,
        data: &mut Data,
        s: &SessionArgs,
    ) -> CommandResult<i64> {
        let txn_number = s.txn_number.ok_or_else(|| {
            CommandError::new(
                codes::NO_SUCH_TRANSACTION,
                "a transaction statement needs a txnNumber",
            )
        })?;
        let starts = s.start_transaction
            && !self
                .transaction_begun
                .load(std::sync::atomic::Ordering::Relaxed);
        session::begin_or_continue(
            data,
            &s.key,
            &s.lsid,
            txn_number,
            starts,
            s.read_concern_level.as_deref(),
            s.at_cluster_time,
        )?;
        self.transaction_begun
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(txn_number)
    }

    /// Runs `f` with read access to the catalog the command should see: a transaction's
    /// snapshot, the catalog as of the snapshot read time (`readConcern` level `snapshot`
    /// outside transactions, on the commands that take it), or today's catalog.
    pub fn read<R>(&self, f: impl FnOnce(&Catalog, &Data) -> CommandResult<R>) -> CommandResult<R> {
        let mut guard = self.engine.data.lock();
        if let Some(s) = self.session.as_ref().filter(|s| s.in_transaction()) {
            self.begin_or_continue_transaction(&mut guard, s)?;
            let data: &Data = &guard;
            let t = data
                .sessions
                .map
                .get(&s.key)
                .and_then(|s| s.txn.as_ref())
                .expect("open txn");
            if let (Some(changes), Some(ns)) = (&t.snapshot_changes, self.target_namespace()) {
                changes.check(&ns, t.read_ts)?;
            }
            return f(&t.catalog, data);
        }
        let data: &Data = &guard;
        if fields::read_concern_level(self.cmd) == Some("snapshot")
            && SNAPSHOT_READ_COMMANDS.contains(&self.name.as_str())
        {
            // Without atClusterTime: the latest (majority-committed) time, reported back.
            let at = fields::read_concern_at_cluster_time(self.cmd)
                .unwrap_or_else(|| data.clock.current());
            let snap = crate::snapshot::catalog_at(data, at)?;
            if let Some(ns) = self.target_namespace() {
                snap.changes.check(&ns, at)?;
            }
            *self.snapshot_read_at.lock() = Some(at);
            return f(&snap.catalog, data);
        }
        f(&data.catalog, data)
    }

    /// `db.<coll>` of a command whose first field names a collection.
    fn target_namespace(&self) -> Option<crate::store::Namespace> {
        match self.cmd.get(&self.name) {
            Some(Bson::String(coll)) => Some(crate::store::Namespace::new(self.db.clone(), coll)),
            _ => None,
        }
    }

    /// Outside transactions, `readConcern` level `snapshot` on a command that does not take
    /// it (`count`): 72, as the server's `supportsReadConcern` check answers.
    pub fn check_snapshot_support(&self) -> CommandResult<()> {
        if self.in_transaction()
            || fields::read_concern_level(self.cmd) != Some("snapshot")
            || SNAPSHOT_READ_COMMANDS.contains(&self.name.as_str())
        {
            return Ok(());
        }
        let at = match fields::read_concern_at_cluster_time(self.cmd) {
            Some(at) => format!(", atClusterTime: {}", crate::snapshot::ts_string(at)),
            None => String::new(),
        };
        Err(CommandError::new(
            codes::INVALID_OPTIONS,
            format!(
                "Command {} does not support {{ readConcern: {{ level: \"snapshot\"{at} }} }} :: caused by :: read concern snapshot not supported",
                self.name,
            ),
        ))
    }
}

fn cluster_time_doc(ts: Timestamp) -> Document {
    doc! {
        "clusterTime": ts,
        "signature": {"hash": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![0u8; 20] }, "keyId": 0i64},
    }
}

/// Adds `ok`, `$clusterTime` and `operationTime` to a reply.
pub fn finish_reply(engine: &Engine, mut body: Document) -> Document {
    let ts = engine.cluster_time();
    body.insert("ok", 1.0);
    body.insert("$clusterTime", cluster_time_doc(ts));
    body.insert("operationTime", ts);
    body
}

pub fn error_reply(engine: &Engine, err: &CommandError, labels: &[String]) -> Document {
    let ts = engine.cluster_time();
    let mut body = doc! {
        "ok": 0.0,
        "errmsg": err.message.clone(),
        "code": err.code,
        "codeName": match (err.code_name, code_name(err.code)) {
            ("", "") => format!("Location{}", err.code),
            ("", known) => known.to_string(),
            (name, _) => name.to_string(),
        },
    };
    if let Some(extra) = &err.extra {
        for (k, v) in extra.iter() {
            body.insert(k.clone(), v.clone());
        }
    }
    if !labels.is_empty() {
        body.insert(
            "errorLabels",
            labels
                .iter()
                .map(|l| Bson::String(l.clone()))
                .collect::<Vec<_>>(),
        );
    }
    body.insert("$clusterTime", cluster_time_doc(ts));
    body.insert("operationTime", ts);
    body
}

fn is_transient_txn_code(code: i32) -> bool {
    matches!(code, 112 | 24 | 267 | 239 | 246 | 250 | 272)
}

/// Server-side error labels (`error_labels.cpp`): transient-transaction, retryable-write,
/// resumable change stream, non-resumable change stream.
fn compute_labels(
    ctx: &Ctx<'_>,
    err: &CommandError,
    change_stream: bool,
    has_wce: bool,
) -> Vec<String> {
    let mut labels = err.labels.clone();
    let code = err.code;
    let is_commit_or_abort = matches!(ctx.name.as_str(), "commitTransaction" | "abortTransaction");
    let in_txn = ctx.in_transaction();
    if in_txn {
        let transient = is_transient_txn_code(code)
            || (!is_commit_or_abort && is_retriable_code(code))
            || (code == codes::NO_SUCH_TRANSACTION && !has_wce);
        if transient && !labels.iter().any(|l| l == TRANSIENT_TRANSACTION_ERROR) {
            labels.push(TRANSIENT_TRANSACTION_ERROR.into());
        }
    }
    if labels.iter().any(|l| l == TRANSIENT_TRANSACTION_ERROR) {
        return labels;
    }
    let retryable_write = ctx
        .session
        .as_ref()
        .is_some_and(|s| s.txn_number.is_some() && s.autocommit.is_none())
        && RETRYABLE_WRITE_COMMANDS.contains(&ctx.name.as_str());
    if (retryable_write || (is_commit_or_abort && in_txn)) && is_retriable_code(code) {
        labels.push("RetryableWriteError".into());
        return labels;
    }
    if change_stream
        && !has_wce
        && (is_retriable_code(code)
            || is_network_code(code)
            || matches!(code, 150 | 13388 | 234 | 133))
    {
        labels.push("ResumableChangeStreamError".into());
    }
    if matches!(code, 280 | 286)
        && !labels
            .iter()
            .any(|l| l == crate::changestream::NON_RESUMABLE_LABEL)
    {
        labels.push(crate::changestream::NON_RESUMABLE_LABEL.into());
    }
    labels
}

fn session_args(cmd: &Document) -> CommandResult<Option<SessionArgs>> {
    let Some(lsid) = cmd.get("lsid") else {
        if cmd.contains_key("txnNumber") {
            return Err(CommandError::new(
                codes::INVALID_OPTIONS,
                "Transaction numbers are only allowed in the context of a session",
            ));
        }
        return Ok(None);
    };
    let lsid = lsid
        .as_document()
        .ok_or_else(|| CommandError::type_mismatch("lsid must be an object"))?
        .clone();
    let txn_number = match cmd.get("txnNumber") {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(*n as i64),
        Some(_) => return Err(CommandError::type_mismatch("txnNumber must be a long")),
        None => None,
    };
    let autocommit = cmd.get_bool("autocommit").ok();
    if autocommit == Some(true) {
        return Err(CommandError::new(
            codes::INVALID_OPTIONS,
            "Specifying autocommit=true is not allowed.",
        ));
    }
    Ok(Some(SessionArgs {
        key: lsid_key(&lsid),
        lsid,
        txn_number,
        autocommit,
        start_transaction: cmd.get_bool("startTransaction").unwrap_or(false),
        read_concern_level: fields::read_concern_level(cmd).map(str::to_string),
        at_cluster_time: fields::read_concern_at_cluster_time(cmd),
    }))
}

/// The namespace a command targets, for `failCommand`'s `namespace` filter.
fn command_namespace(db: &str, name: &str, cmd: &Document) -> Option<String> {
    match cmd.get(name) {
        Some(Bson::String(coll)) => Some(format!("{db}.{coll}")),
        _ => None,
    }
}

/// Executes one command and builds its reply.
pub async fn execute(engine: &Arc<Engine>, conn: &mut ConnInfo, cmd: Document) -> Outcome {
    match execute_with_batch(engine, conn, cmd, None)
        .await
        .into_reply()
    {
        Some(reply) => Outcome::Reply(reply),
        None => Outcome::Close,
    }
}

/// [`execute`] of a command whose `update` statements were kept raw by the wire decoding
/// ([`crate::wire::OpMsg::into_parts`]).
pub async fn execute_with_batch(
    engine: &Arc<Engine>,
    conn: &mut ConnInfo,
    cmd: Document,
    raw_updates: Option<crate::wire::RawBatch>,
) -> Outcome {
    // `maxTimeMS` counts from the command's arrival, as the server's operation deadline does
    // (time blocked by a fail point included).
    let received = std::time::Instant::now();
    let Some(name) = cmd.keys().next().cloned() else {
        let e = CommandError::new(codes::FAILED_TO_PARSE, "empty command");
        return Outcome::Reply(error_reply(engine, &e, &[]));
    };
    let db = match cmd.get("$db") {
        Some(Bson::String(db)) => db.clone(),
        _ => {
            let e = CommandError::new(40571, "OP_MSG requests require a $db argument");
            return Outcome::Reply(error_reply(engine, &e, &[]));
        }
    };
    // Authentication: the SASL conversation, then the gate for everything else.
    if name == "saslStart" || name == "saslContinue" {
        let result = match &engine.config.auth {
            None => Err(CommandError::new(
                crate::auth::AUTHENTICATION_FAILED,
                "Authentication failed.",
            )),
            Some(cred) if name == "saslStart" => conn.auth.sasl_start(cred, &db, &cmd),
            Some(cred) => conn.auth.sasl_continue(cred, &cmd),
        };
        return Outcome::Reply(match result {
            Ok(body) => finish_reply(engine, body),
            Err(e) => {
                tracing::info!(connection = conn.id, error = %e, "authentication failed");
                error_reply(engine, &e, &[])
            }
        });
    }
    if engine.config.auth.is_some()
        && !conn.auth.is_authenticated()
        && !crate::auth::UNAUTHENTICATED_COMMANDS.contains(&name.as_str())
    {
        let e = CommandError::new(
            codes::UNAUTHORIZED,
            format!("Command {name} requires authentication"),
        );
        return Outcome::Reply(error_reply(engine, &e, &[]));
    }
    let conn: &ConnInfo = conn;
    // Fail points first: `configureFailPoint` itself is never failed.
    let mut action: Option<Action> = None;
    if name != "configureFailPoint" {
        let mut fps = engine.failpoints.lock();
        if !fps.is_empty() {
            let ns = command_namespace(&db, &name, &cmd);
            action = fps.evaluate(FAIL_COMMAND, &name, conn.app_name.as_deref(), ns.as_deref());
        }
    }
    let session = match session_args(&cmd) {
        Ok(s) => s,
        Err(e) => return Outcome::Reply(error_reply(engine, &e, &[])),
    };
    let mut cmd = cmd;
    let raw_updates = match raw_updates {
        Some(batch) if name == "update" => Some(batch),
        Some(batch) => {
            // Only an `update`'s statements are kept raw; anything else sees its field.
            cmd.insert("updates", batch.to_array());
            None
        }
        None => None,
    };
    // The batch of a write moves out of the command: its documents are stored (insert) or
    // become the stored documents (update's replacements) without a copy.
    let batch_key = match name.as_str() {
        "insert" => Some("documents"),
        "update" => Some("updates"),
        _ => None,
    };
    let documents = match batch_key.map(|k| (k, cmd.get(k))) {
        Some((key, Some(Bson::Array(_)))) => match cmd.remove(key) {
            Some(Bson::Array(docs)) => Some(docs),
            _ => None,
        },
        _ => None,
    };
    let statements = match name.as_str() {
        "update" => raw_updates
            .as_ref()
            .map(|b| b.len())
            .or(documents.as_ref().map(|d| d.len())),
        "insert" => documents.as_ref().map(|d| d.len()),
        "delete" => cmd.get_array("deletes").ok().map(|d| d.len()),
        _ => None,
    };
    engine.opcounters.count(&name, statements.unwrap_or(0));
    let ctx = Ctx {
        engine,
        conn,
        db,
        name: name.clone(),
        cmd: &cmd,
        session,
        close_after_reply: std::sync::atomic::AtomicBool::new(false),
        documents: parking_lot::Mutex::new(documents),
        raw_updates: parking_lot::Mutex::new(raw_updates),
        repl_counter_at_start: engine.repl.lock().topology_counter,
        snapshot_read_at: parking_lot::Mutex::new(None),
        transaction_begun: std::sync::atomic::AtomicBool::new(false),
        encoded_array: parking_lot::Mutex::new(None),
    };
    let change_stream_cmd = is_change_stream_command(engine, &name, &cmd);
    if let Some(a) = &action {
        if let Some(ms) = a.block_ms {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if a.close_connection {
            return Outcome::Close;
        }
        if let Some(err) = &a.error {
            let labels = match &a.error_labels {
                Some(l) => l.clone(),
                // failCommand fires before a getMore checks its cursor out: no resumable label.
                None => compute_labels(&ctx, err, change_stream_cmd && name != "getMore", false),
            };
            return Outcome::Reply(error_reply(engine, err, &labels));
        }
    }
    if let Some(e) = write_deadline_passed(&ctx, received) {
        return Outcome::Reply(error_reply(engine, &e, &[]));
    }
    let wce = action
        .as_ref()
        .and_then(|a| a.write_concern_error.clone())
        .or_else(|| unsatisfiable_write_concern(&name, &cmd));
    let result = run(&ctx, change_stream_cmd).await;
    if ctx
        .close_after_reply
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        // The write is applied and recorded; the acknowledgement is lost.
        return Outcome::Close;
    }
    match result {
        Ok(body) => {
            let mut reply = finish_reply(engine, body);
            if let Some(wce) = wce {
                reply.insert("writeConcernError", wce.clone());
                let code = wce.get_i32("code").unwrap_or(0);
                let labels = match action.as_ref().and_then(|a| a.error_labels.clone()) {
                    Some(l) => l,
                    None => {
                        let pseudo = CommandError::new(code, "");
                        compute_labels(&ctx, &pseudo, false, true)
                    }
                };
                if !labels.is_empty() {
                    reply.insert("errorLabels", labels);
                }
            }
            match ctx.encoded_array.lock().take() {
                Some((key, array)) if crate::store::value_at_path(&reply, key).is_some() => {
                    Outcome::ReplyWithArray {
                        body: reply,
                        key,
                        array,
                    }
                }
                _ => Outcome::Reply(reply),
            }
        }
        Err(err) => {
            if ctx.in_transaction() && aborts_transaction(&ctx, &err) {
                // MongoDB aborts a transaction when one of its statements fails.
                ctx.abort_transaction_after_error();
            }
            let labels = compute_labels(&ctx, &err, change_stream_cmd, false);
            Outcome::Reply(error_reply(engine, &err, &labels))
        }
    }
}

/// Whether a failed statement aborts its transaction: every error does, except those that
/// say the statement is not part of the open transaction (an older or unknown `txnNumber`, a
/// committed transaction, a second `startTransaction`), and the answers of
/// `commitTransaction`/`abortTransaction`, which settle the transaction themselves.
fn aborts_transaction(ctx: &Ctx<'_>, err: &CommandError) -> bool {
    !matches!(ctx.name.as_str(), "commitTransaction" | "abortTransaction")
        && !matches!(
            err.code,
            codes::TRANSACTION_TOO_OLD
                | codes::NO_SUCH_TRANSACTION
                | codes::TRANSACTION_COMMITTED
                | codes::CONFLICTING_OPERATION_IN_PROGRESS
        )
}

/// Commands that wait for their write concern (and answer `writeConcernError` when it cannot
/// be satisfied).
const WRITE_CONCERN_COMMANDS: &[&str] = &[
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
    "commitTransaction",
    "abortTransaction",
    "create",
    "drop",
    "dropDatabase",
    "renameCollection",
    "collMod",
    "createIndexes",
    "dropIndexes",
    "deleteIndexes",
];

/// The `writeConcernError` MongoDB answers, with the write applied, when the command's write
/// concern can never be satisfied by this one-member set: a numeric `w` above the number of
/// data-bearing members → 100 UnsatisfiableWriteConcern `Not enough data-bearing nodes`
/// (immediately, without waiting for `wtimeout`); a `w` mode name other than `majority` (no
/// tagged modes are configured) → 79 UnknownReplWriteConcern `No write concern mode named
/// '<w>' found in replica set configuration`; a `w` tag-set document (members carry no tags)
/// → 100.
fn unsatisfiable_write_concern(name: &str, cmd: &Document) -> Option<Document> {
    const DATA_BEARING_MEMBERS: i64 = 1;
    if !WRITE_CONCERN_COMMANDS.contains(&name) {
        return None;
    }
    let wc = cmd.get_document("writeConcern").ok()?;
    let (code, message) = match wc.get("w")? {
        w @ (Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_)) => {
            let n = crate::store::as_i64(w)?;
            if n <= DATA_BEARING_MEMBERS {
                return None;
            }
            (
                codes::UNSATISFIABLE_WRITE_CONCERN,
                "Not enough data-bearing nodes".to_string(),
            )
        }
        Bson::String(mode) if mode == "majority" => return None,
        Bson::String(mode) => (
            codes::UNKNOWN_REPL_WRITE_CONCERN,
            format!("No write concern mode named '{mode}' found in replica set configuration"),
        ),
        Bson::Document(_) => (
            codes::UNSATISFIABLE_WRITE_CONCERN,
            "Not enough nodes match write concern tags".to_string(),
        ),
        _ => return None,
    };
    let mut echoed = doc! {"w": wc.get("w").cloned().unwrap_or(Bson::Int32(1))};
    if let Some(j) = wc.get("j") {
        echoed.insert("j", j.clone());
    }
    echoed.insert(
        "wtimeout",
        wc.get("wtimeout").cloned().unwrap_or(Bson::Int32(0)),
    );
    echoed.insert("provenance", "clientSupplied");
    Some(doc! {
        "code": code,
        "codeName": code_name(code),
        "errmsg": message,
        "errInfo": {"writeConcern": echoed},
    })
}

/// A write or DDL command whose `maxTimeMS` passed before it ran (held by a `blockConnection`
/// fail point, as a server holds one waiting for a lock) fails with MaxTimeMSExpired (50) and
/// changes nothing. (Reads use `maxTimeMS` as their await bound and are not checked here.)
fn write_deadline_passed(ctx: &Ctx<'_>, received: std::time::Instant) -> Option<CommandError> {
    if !matches!(
        ctx.name.as_str(),
        "insert"
            | "update"
            | "delete"
            | "findAndModify"
            | "findandmodify"
            | "create"
            | "drop"
            | "collMod"
            | "createIndexes"
            | "dropIndexes"
            | "renameCollection"
            | "dropDatabase"
    ) {
        return None;
    }
    let limit = match ctx.cmd.get("maxTimeMS") {
        Some(Bson::Int32(v)) => *v as i64,
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Double(v)) => *v as i64,
        _ => return None,
    };
    (limit > 0 && received.elapsed() >= std::time::Duration::from_millis(limit as u64))
        .then(|| CommandError::new(codes::MAX_TIME_MS_EXPIRED, "operation exceeded time limit"))
}

fn is_change_stream_command(engine: &Engine, name: &str, cmd: &Document) -> bool {
    match name {
        "aggregate" => cmd
            .get_array("pipeline")
            .ok()
            .and_then(|p| p.first())
            .and_then(|s| s.as_document())
            .is_some_and(|s| s.contains_key("$changeStream")),
        "getMore" => {
            let id = match cmd.get("getMore") {
                Some(Bson::Int64(id)) => *id,
                _ => return false,
            };
            engine
                .cursors
                .lock()
                .map
                .get(&id)
                .is_some_and(|c| matches!(c.kind, crate::cursor::CursorKind::ChangeStream(_)))
        }
        _ => false,
    }
}

async fn run(ctx: &Ctx<'_>, change_stream_cmd: bool) -> CommandResult<Document> {
    fields::check_command(&ctx.name, ctx.cmd)?;
    if ctx.name == "update" {
        if let Some(stmts) = ctx.documents.lock().as_deref() {
            fields::check_update_statements(stmts)?;
        }
        if let Some(batch) = ctx.raw_updates.lock().as_ref() {
            fields::check_raw_update_statements(batch)?;
        }
    }
    repl::gate(ctx)?;
    if ctx.in_transaction() && !TRANSACTION_COMMANDS.contains(&ctx.name.as_str()) {
        return Err(CommandError::new(
            codes::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
            format!("Cannot run '{}' in a multi-document transaction.", ctx.name),
        ));
    }
    if ctx.in_transaction() && change_stream_cmd && ctx.name == "aggregate" {
        return Err(CommandError::new(
            codes::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
            "Operation not permitted in transaction :: caused by :: $changeStream",
        ));
    }
    // Retryable writes: a retry of an executed (lsid, txnNumber) replays the recorded reply.
    let retryable = ctx
        .session
        .as_ref()
        .filter(|s| s.txn_number.is_some() && s.autocommit.is_none())
        .filter(|_| RETRYABLE_WRITE_COMMANDS.contains(&ctx.name.as_str()))
        .cloned();
    let _checkout = match &retryable {
        Some(s) => Some(ctx.engine.check_out_session(&s.key).await),
        None => None,
    };
    if let Some(s) = &retryable {
        let txn_number = s.txn_number.expect("filtered");
        let check = ctx
            .engine
            .data
            .lock()
            .sessions
            .check_retry(&s.key, &s.lsid, txn_number)?;
        if let RetryCheck::Replay(reply) = check {
            return Ok(reply);
        }
    }
    let txn_write_action = match &retryable {
        Some(_) => ctx.engine.failpoints.lock().evaluate_transactional_write(),
        None => None,
    };
    if let Some(code) = txn_write_action
        .as_ref()
        .and_then(|a| a.fail_before_commit_code)
    {
        return Err(CommandError::new(
            code,
            "Failing write via 'onPrimaryTransactionalWrite' failpoint",
        ));
    }
    let result = dispatch(ctx).await;
    if result.is_ok() && txn_write_action.is_some_and(|a| a.close_connection) {
        ctx.close_after_reply
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let (Some(s), Ok(reply)) = (&retryable, &result) {
        let txn_number = s.txn_number.expect("filtered");
        ctx.engine
            .data
            .lock()
            .sessions
            .record_retry(&s.key, txn_number, reply.clone());
    }
    result
}

async fn dispatch(ctx: &Ctx<'_>) -> CommandResult<Document> {
    match ctx.name.as_str() {
        "hello" | "isMaster" | "ismaster" => {
            repl::await_topology_change(ctx).await;
            Ok(admin::hello_body(
                ctx.engine,
                ctx.conn,
                ctx.cmd,
                ctx.name == "hello",
            ))
        }
        "replSetStepDown" => repl::step_down(ctx),
        "ping" => Ok(Document::new()),
        "buildInfo" | "buildinfo" => Ok(admin::build_info()),
        "serverStatus" => Ok(admin::server_status(ctx.engine)),
        "hostInfo" => Ok(admin::host_info()),
        "getParameter" => admin::get_parameter(ctx.engine, ctx.cmd),
        "setParameter" => admin::set_parameter(ctx),
        "getCmdLineOpts" => Ok(doc! {"argv": ["mongod"], "parsed": {}}),
        "replSetGetConfig" => admin::repl_set_get_config(ctx.engine),
        "replSetGetStatus" => Ok(admin::repl_set_get_status(ctx.engine)),
        "connectionStatus" => {
            let users: Vec<Document> = ctx
                .conn
                .auth
                .user
                .iter()
                .map(|u| doc! {"user": u.clone(), "db": "admin"})
                .collect();
            let roles: Vec<Document> = if users.is_empty() {
                Vec::new()
            } else {
                vec![doc! {"role": "root", "db": "admin"}]
            };
            Ok(doc! {"authInfo": {"authenticatedUsers": users, "authenticatedUserRoles": roles}})
        }
        "whatsmyuri" => Ok(doc! {"you": "127.0.0.1"}),
        "endSessions" => admin::end_sessions(ctx),
        "killAllSessions" | "killSessions" => admin::kill_all_sessions(ctx),
        "configureFailPoint" => admin::configure_fail_point(ctx),
        "commitTransaction" => admin::commit_transaction(ctx),
        "abortTransaction" => admin::abort_transaction(ctx),
        "insert" => crud::insert(ctx),
        "update" => crud::update(ctx),
        "delete" => crud::delete(ctx),
        "findAndModify" | "findandmodify" => crud::find_and_modify(ctx),
        "find" => read::find(ctx),
        "getMore" => read::get_more(ctx).await,
        "killCursors" => read::kill_cursors(ctx),
        "aggregate" => read::aggregate(ctx),
        "count" => read::count(ctx),
        "distinct" => read::distinct(ctx),
        "dbHash" | "dbhash" => read::db_hash(ctx),
        "listDatabases" => read::list_databases(ctx),
        "listCollections" => read::list_collections(ctx),
        "listIndexes" => read::list_indexes(ctx),
        "collStats" => read::coll_stats(ctx),
        "dbStats" => read::db_stats(ctx),
        "create" => ddl::create(ctx),
        "drop" => ddl::drop(ctx),
        "dropDatabase" => ddl::drop_database(ctx),
        "renameCollection" => ddl::rename_collection(ctx),
        "collMod" => ddl::coll_mod(ctx),
        "createIndexes" => ddl::create_indexes(ctx),
        "dropIndexes" | "deleteIndexes" => ddl::drop_indexes(ctx),
        other => Err(CommandError::new(
            codes::COMMAND_NOT_FOUND,
            format!("no such command: '{other}'"),
        )),
    }
}

/// Reads a collection-name argument (`{find: "coll"}` etc.).
pub fn coll_arg(ctx: &Ctx<'_>) -> CommandResult<crate::store::Namespace> {
    match ctx.cmd.get(&ctx.name) {
        Some(Bson::String(c)) => {
            let ns = crate::store::Namespace::new(ctx.db.clone(), c.clone());
            crate::store::check_names(&ns)?;
            Ok(ns)
        }
        _ => Err(CommandError::new(
            codes::INVALID_NAMESPACE,
            format!(
                "collection name has invalid type {}",
                ctx.cmd
                    .get(&ctx.name)
                    .map(|b| format!("{:?}", b.element_type()))
                    .unwrap_or_default()
            ),
        )),
    }
}

/// Integer argument accepting int32, int64 and integral doubles.
pub fn int_arg(cmd: &Document, key: &str) -> CommandResult<Option<i64>> {
    match cmd.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(b) => crate::store::as_i64(b)
            .map(Some)
            .ok_or_else(|| CommandError::type_mismatch(format!("'{key}' must be a number"))),
    }
}

//! `configureFailPoint` with `failCommand` (and `failGetMoreAfterCursorCheckout`), as the
//! driver test suites use it: modes `alwaysOn`, `off`, `{times}`, `{skip}`; data
//! `failCommands`, `errorCode`, `errorLabels`, `closeConnection`, `blockConnection` +
//! `blockTimeMS`, `writeConcernError`, `appName`, `namespace`, `errorExtraInfo`.

use std::collections::HashMap;

use bson::{Bson, Document};

use crate::error::{CommandError, CommandResult};

pub const FAIL_COMMAND: &str = "failCommand";
pub const FAIL_GET_MORE_AFTER_CURSOR_CHECKOUT: &str = "failGetMoreAfterCursorCheckout";
/// Fires on retryable writes (`lsid` + `txnNumber`): `closeConnection` (default true) closes
/// the connection after the write committed (the lost-acknowledgement case);
/// `failBeforeCommitExceptionCode` fails the write before it is applied.
pub const ON_PRIMARY_TRANSACTIONAL_WRITE: &str = "onPrimaryTransactionalWrite";

/// What `onPrimaryTransactionalWrite` asks for when it fires.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransactionalWriteAction {
    pub close_connection: bool,
    pub fail_before_commit_code: Option<i32>,
}

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    AlwaysOn,
    Times(i64),
    Skip(i64),
}

#[derive(Debug, Clone)]
struct FailPoint {
    mode: Mode,
    data: Document,
}

/// What a fired fail point tells the command dispatcher to do.
#[derive(Debug, Clone, Default)]
pub struct Action {
    pub block_ms: Option<u64>,
    pub close_connection: bool,
    pub error: Option<CommandError>,
    /// `Some(labels)` replaces the labels the server would compute.
    pub error_labels: Option<Vec<String>>,
    pub write_concern_error: Option<Document>,
}

#[derive(Default)]
pub struct FailPoints {
    points: HashMap<String, FailPoint>,
    /// Times each fail point was entered (what `configureFailPoint` replies as `count`).
    entered: HashMap<String, i64>,
}

fn as_int(b: &Bson) -> Option<i64> {
    crate::store::as_i64(b)
}

impl FailPoints {
    /// Handles `configureFailPoint`; returns the reply's `count`.
    pub fn configure(&mut self, cmd: &Document) -> CommandResult<i64> {
        let name = cmd
            .get_str("configureFailPoint")
            .map_err(|_| CommandError::failed_to_parse("configureFailPoint must be a string"))?
            .to_string();
        if name != FAIL_COMMAND
            && name != FAIL_GET_MORE_AFTER_CURSOR_CHECKOUT
            && name != ON_PRIMARY_TRANSACTIONAL_WRITE
        {
            return Err(CommandError::bad_value(format!(
                "Cannot find failpoint: {name}"
            )));
        }
        let mode = match cmd.get("mode") {
            Some(Bson::String(s)) if s == "alwaysOn" => Some(Mode::AlwaysOn),
            Some(Bson::String(s)) if s == "off" => None,
            Some(Bson::Document(d)) => {
                if d.contains_key("times") && d.contains_key("skip") {
                    return Err(CommandError::bad_value(
                        "'times' and 'skip' are mutually exclusive",
                    ));
                }
                if let Some(t) = d.get("times").and_then(as_int) {
                    if t < 0 {
                        return Err(CommandError::bad_value("'times' must be non-negative"));
                    }
                    Some(Mode::Times(t))
                } else if let Some(s) = d.get("skip").and_then(as_int) {
                    Some(Mode::Skip(s))
                } else if d.contains_key("activationProbability") {
                    Some(Mode::AlwaysOn)
                } else {
                    return Err(CommandError::bad_value("unsupported fail point mode"));
                }
            }
            _ => {
                return Err(CommandError::bad_value(
                    "'mode' must be \"alwaysOn\", \"off\" or a document",
                ))
            }
        };
        let data = cmd.get_document("data").cloned().unwrap_or_default();
        if mode.is_some() && name == FAIL_COMMAND {
            if !matches!(data.get("failCommands"), Some(Bson::Array(_)))
                && !data.get_bool("failAllCommands").unwrap_or(false)
            {
                return Err(CommandError::bad_value(
                    "'failCommands' must be an array of command names",
                ));
            }
            if data.get_bool("blockConnection").unwrap_or(false)
                && data.get("blockTimeMS").and_then(as_int).is_none()
            {
                return Err(CommandError::bad_value(
                    "'blockTimeMS' is required when 'blockConnection' is true",
                ));
            }
        }
        let count = *self.entered.get(&name).unwrap_or(&0);
        match mode {
            Some(mode) => {
                self.points.insert(name.clone(), FailPoint { mode, data });
            }
            None => {
                self.points.remove(&name);
            }
        }
        self.entered.insert(name, 0);
        Ok(count)
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Counts an activation of `name` and applies its mode; returns the fail point's data
    /// when it fires.
    fn activate(&mut self, name: &str) -> Option<Document> {
        let fp = self.points.get_mut(name)?;
        *self.entered.entry(name.to_string()).or_default() += 1;
        match &mut fp.mode {
            Mode::AlwaysOn => {}
            Mode::Times(n) => {
                if *n <= 0 {
                    self.points.remove(name);
                    return None;
                }
                *n -= 1;
            }
            Mode::Skip(n) => {
                if *n > 0 {
                    *n -= 1;
                    return None;
                }
            }
        }
        let fp = self.points.get(name)?.clone();
        if let Mode::Times(0) = fp.mode {
            self.points.remove(name);
        }
        Some(fp.data)
    }

    /// Evaluates `onPrimaryTransactionalWrite` for a retryable write about to be executed.
    pub fn evaluate_transactional_write(&mut self) -> Option<TransactionalWriteAction> {
        let data = self.activate(ON_PRIMARY_TRANSACTIONAL_WRITE)?;
        Some(TransactionalWriteAction {
            close_connection: data.get_bool("closeConnection").unwrap_or(true),
            fail_before_commit_code: data
                .get("failBeforeCommitExceptionCode")
                .and_then(as_int)
                .map(|c| c as i32),
        })
    }

    /// Evaluates fail point `name` for a command; consumes one activation when it fires.
    pub fn evaluate(
        &mut self,
        name: &str,
        command: &str,
        app_name: Option<&str>,
        ns: Option<&str>,
    ) -> Option<Action> {
        let fp = self.points.get(name)?;
        let data = &fp.data;
        let listed = data.get_bool("failAllCommands").unwrap_or(false)
            || data.get_array("failCommands").is_ok_and(|cmds| {
                cmds.iter().any(|c| {
                    c.as_str().is_some_and(|c| {
                        c == command
                            || (c.eq_ignore_ascii_case("ismaster")
                                && command.eq_ignore_ascii_case("ismaster"))
                    })
                })
            })
            || name == FAIL_GET_MORE_AFTER_CURSOR_CHECKOUT;
        if !listed {
            return None;
        }
        if let Ok(want) = data.get_str("appName") {
            if app_name != Some(want) {
                return None;
            }
        }
        if let Ok(want) = data.get_str("namespace") {
            if ns != Some(want) {
                return None;
            }
        }
        let close = data.get_bool("closeConnection").unwrap_or(false);
        let block = data.get_bool("blockConnection").unwrap_or(false);
        let code = data.get("errorCode").and_then(as_int);
        let wce = data.get_document("writeConcernError").ok().cloned();
        if !close && !block && code.is_none() && wce.is_none() {
            return None;
        }
        let data = self.activate(name)?;
        let error = code.map(|c| {
            let mut e = CommandError::new(c as i32, "Failing command via 'failCommand' failpoint");
            if let Ok(extra) = data.get_document("errorExtraInfo") {
                e = e.with_extra(extra.clone());
            }
            e
        });
        let error_labels = data.get_array("errorLabels").ok().map(|labels| {
            labels
                .iter()
                .filter_map(|l| l.as_str().map(str::to_string))
                .collect()
        });
        Some(Action {
            block_ms: if block {
                data.get("blockTimeMS")
                    .and_then(as_int)
                    .map(|v| v.max(0) as u64)
            } else {
                None
            },
            close_connection: close,
            error,
            error_labels,
            write_concern_error: wce,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn times_mode_fires_n_times() {
        let mut f = FailPoints::default();
        f.configure(&doc! {"configureFailPoint": "failCommand", "mode": {"times": 2}, "data": {"failCommands": ["insert"], "errorCode": 91}}).unwrap();
        assert!(f.evaluate(FAIL_COMMAND, "find", None, None).is_none());
        assert_eq!(
            f.evaluate(FAIL_COMMAND, "insert", None, None)
                .unwrap()
                .error
                .unwrap()
                .code,
            91
        );
        assert!(f.evaluate(FAIL_COMMAND, "insert", None, None).is_some());
        assert!(f.evaluate(FAIL_COMMAND, "insert", None, None).is_none());
    }

    #[test]
    fn skip_and_app_name() {
        let mut f = FailPoints::default();
        f.configure(&doc! {"configureFailPoint": "failCommand", "mode": {"skip": 1}, "data": {"failCommands": ["find"], "closeConnection": true, "appName": "x"}}).unwrap();
        assert!(f.evaluate(FAIL_COMMAND, "find", Some("y"), None).is_none());
        assert!(f.evaluate(FAIL_COMMAND, "find", Some("x"), None).is_none());
        assert!(
            f.evaluate(FAIL_COMMAND, "find", Some("x"), None)
                .unwrap()
                .close_connection
        );
        let count = f
            .configure(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
            .unwrap();
        assert_eq!(count, 2);
        assert!(f.evaluate(FAIL_COMMAND, "find", Some("x"), None).is_none());
    }

    #[test]
    fn bad_modes_rejected() {
        let mut f = FailPoints::default();
        assert!(f.configure(&doc! {"configureFailPoint": "failCommand", "mode": {"times": 1, "skip": 1}, "data": {"failCommands": ["a"]}}).is_err());
        assert!(f
            .configure(&doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": {}})
            .is_err());
        assert!(f
            .configure(&doc! {"configureFailPoint": "nope", "mode": "off"})
            .is_err());
    }
}

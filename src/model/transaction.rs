//! One source transaction seen by several workers (`apply.transactions = "atomic"`, DESIGN
//! §2.4). A shared stream's reader opens a group when it routes a transaction's first event
//! and closes it once the stream shows what follows (the next event, or an empty reply: a
//! transaction commits all its oplog entries at once). Each member worker brings its part
//! once it has applied everything before it; the first worker to find every part there
//! writes them all in one destination transaction. A member that cannot take part (it left
//! the stream, its policy needs conditional writes, it is replaying) turns the whole group
//! into per-document writes, which converge the same way, only not atomically.

use std::{collections::HashMap, sync::Arc};

use bson::RawDocumentBuf;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::model::event::ChangeEvent;

/// A source transaction: its session id and transaction number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxnKey {
    lsid: Vec<u8>,
    txn_number: i64,
}

impl TxnKey {
    /// The transaction an event belongs to, if it was written by one.
    pub fn of(ev: &ChangeEvent) -> Option<TxnKey> {
        let txn_number = ev.txn_number()?;
        let lsid = ev.lsid()?;
        Some(TxnKey {
            lsid: lsid.as_bytes().to_vec(),
            txn_number,
        })
    }
}

/// One write of a part, as it goes into the destination transaction.
#[derive(Debug, Clone)]
pub struct TxnWrite {
    pub db: String,
    pub coll: String,
    /// `update` or `delete`.
    pub command: &'static str,
    pub statement: RawDocumentBuf,
    /// A delta must find its document; one that does not means the destination diverged, and
    /// the per-document path (which repairs from the source) takes over.
    pub must_match: bool,
    pub bypass_validation: bool,
    /// The checkpoint write that fences the transaction (`ha.fencing = "transaction"`): an
    /// error on it means another instance took the lease over.
    pub fence: bool,
}

/// What one member worker brings: its namespace's writes, in source order.
#[derive(Debug, Clone)]
pub struct TxnPart {
    pub namespace: String,
    pub writes: Vec<TxnWrite>,
}

/// How a group ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every part was written in one destination transaction.
    Committed,
    /// Each member applies its own events per document; the reason is logged.
    PerDocument(String),
}

#[derive(Default)]
struct GroupState {
    /// Events routed to each member namespace.
    expected: HashMap<String, usize>,
    closed: bool,
    arrived: Vec<TxnPart>,
    /// Members whose part was applied another way (before a restart, from their own stream):
    /// the others do not wait for them.
    excused: std::collections::HashSet<String>,
    executing: bool,
    outcome: Option<TxnOutcome>,
}

/// What a member finds when it looks at its group.
pub enum TxnTurn {
    /// Not decided yet: wait for a change.
    Wait,
    /// Every part is here and this member writes them.
    Execute(Vec<TxnPart>),
    Done(TxnOutcome),
}

/// The rendezvous of one source transaction's member workers.
pub struct TxnGroup {
    pub key: TxnKey,
    state: Mutex<GroupState>,
    changed: watch::Sender<u64>,
}

impl TxnGroup {
    fn new(key: TxnKey) -> TxnGroup {
        TxnGroup {
            key,
            state: Mutex::new(GroupState::default()),
            changed: watch::channel(0).0,
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A receiver that wakes on the next change (subscribe before looking at the state).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The reader routed one more of the transaction's events to `namespace`.
    pub fn routed(&self, namespace: &str) {
        *self
            .state
            .lock()
            .expected
            .entry(namespace.to_string())
            .or_default() += 1;
    }

    /// The reader has seen what follows the transaction: its members are known.
    pub fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        if st.expected.is_empty() && st.outcome.is_none() {
            st.outcome = Some(TxnOutcome::PerDocument("no member".into()));
        }
        drop(st);
        self.notify();
    }

    pub fn is_finished(&self) -> bool {
        self.state.lock().outcome.is_some()
    }

    /// Once the group is closed: how many events `namespace` takes part with (`Some(0)`: it
    /// is not a member). `None` while the reader may still route events of it.
    pub fn expected_for(&self, namespace: &str) -> Option<usize> {
        let st = self.state.lock();
        st.closed
            .then(|| st.expected.get(namespace).copied().unwrap_or(0))
    }

    /// Turns the group into per-document writes unless its transaction is already being
    /// written (a member that arrived is unaffected by a decline that comes later).
    pub fn decline(&self, reason: &str) {
        let mut st = self.state.lock();
        if st.executing || st.outcome.is_some() {
            return;
        }
        st.outcome = Some(TxnOutcome::PerDocument(reason.to_string()));
        drop(st);
        self.notify();
    }

    /// A member left the stream: unless it already brought its part, nobody will.
    pub fn member_left(&self, namespace: &str) {
        let missing = {
            let st = self.state.lock();
            st.expected.contains_key(namespace)
                && !st.arrived.iter().any(|p| p.namespace == namespace)
        };
        if missing {
            self.decline(&format!("{namespace} left the shared stream"));
        }
    }

    /// `namespace` will not bring its part and has applied it another way (it skipped events
    /// a previous run had applied, or read them from its own stream): the other parts are
    /// still written together.
    pub fn excuse(&self, namespace: &str) {
        let mut st = self.state.lock();
        st.excused.insert(namespace.to_string());
        let nothing_left = st.closed
            && st.arrived.is_empty()
            && st.expected.keys().all(|ns| st.excused.contains(ns));
        if nothing_left && st.outcome.is_none() && !st.executing {
            st.outcome = Some(TxnOutcome::PerDocument("every member excused".into()));
        }
        drop(st);
        self.notify();
    }

    /// A member brings its part.
    pub fn arrive(&self, part: TxnPart) {
        self.state.lock().arrived.push(part);
        self.notify();
    }

    /// What a member that has arrived should do now.
    pub fn turn(&self) -> TxnTurn {
        let mut st = self.state.lock();
        if let Some(o) = &st.outcome {
            return TxnTurn::Done(o.clone());
        }
        let complete = st.closed
            && st
                .expected
                .keys()
                .all(|ns| st.excused.contains(ns) || st.arrived.iter().any(|p| &p.namespace == ns));
        if complete && !st.executing {
            st.executing = true;
            return TxnTurn::Execute(st.arrived.clone());
        }
        TxnTurn::Wait
    }

    /// The executing member reports how the transaction went.
    pub fn finish(&self, outcome: TxnOutcome) {
        let mut st = self.state.lock();
        st.executing = false;
        st.outcome = Some(outcome);
        drop(st);
        self.notify();
    }
}

/// The groups of every shared stream that are not finished yet.
#[derive(Default)]
pub struct TxnRegistry {
    groups: Mutex<HashMap<(String, TxnKey), Arc<TxnGroup>>>,
}

impl TxnRegistry {
    /// Opens the group of `key` on `stream` (finished groups are forgotten here).
    pub fn open(&self, stream: &str, key: TxnKey) -> Arc<TxnGroup> {
        let mut groups = self.groups.lock();
        groups.retain(|_, g| !g.is_finished());
        let group = Arc::new(TxnGroup::new(key.clone()));
        groups.insert((stream.to_string(), key), Arc::clone(&group));
        group
    }

    pub fn find(&self, stream: &str, key: &TxnKey) -> Option<Arc<TxnGroup>> {
        self.groups
            .lock()
            .get(&(stream.to_string(), key.clone()))
            .cloned()
    }

    /// A member left `stream`: the groups still waiting for it will not get its part.
    pub fn member_left(&self, stream: &str, namespace: &str) {
        let groups: Vec<Arc<TxnGroup>> = self
            .groups
            .lock()
            .iter()
            .filter(|((s, _), _)| s == stream)
            .map(|(_, g)| Arc::clone(g))
            .collect();
        for g in groups {
            g.member_left(namespace);
        }
    }

    /// How many groups are open (tests and status).
    pub fn open_groups(&self) -> usize {
        self.groups
            .lock()
            .values()
            .filter(|g| !g.is_finished())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: i64) -> TxnKey {
        TxnKey {
            lsid: vec![1, 2, 3],
            txn_number: n,
        }
    }

    fn part(ns: &str) -> TxnPart {
        TxnPart {
            namespace: ns.into(),
            writes: Vec::new(),
        }
    }

    #[test]
    fn the_first_member_to_find_every_part_writes_them_once() {
        let reg = TxnRegistry::default();
        let g = reg.open("deployment", key(1));
        g.routed("a.x");
        g.routed("a.y");
        g.routed("a.y");
        g.arrive(part("a.x"));
        assert!(matches!(g.turn(), TxnTurn::Wait), "open: more may come");
        g.close();
        assert_eq!(g.expected_for("a.y"), Some(2));
        assert_eq!(g.expected_for("a.z"), Some(0));
        assert!(matches!(g.turn(), TxnTurn::Wait), "a.y has not arrived");
        g.arrive(part("a.y"));
        let TxnTurn::Execute(parts) = g.turn() else {
            panic!("every part is here")
        };
        assert_eq!(parts.len(), 2);
        assert!(matches!(g.turn(), TxnTurn::Wait), "one executor only");
        g.decline("late");
        g.finish(TxnOutcome::Committed);
        assert!(matches!(g.turn(), TxnTurn::Done(TxnOutcome::Committed)));
        assert_eq!(reg.open_groups(), 0);
    }

    #[test]
    fn a_member_that_leaves_before_arriving_turns_the_group_per_document() {
        let reg = TxnRegistry::default();
        let g = reg.open("deployment", key(2));
        g.routed("a.x");
        g.routed("a.y");
        g.close();
        g.arrive(part("a.x"));
        reg.member_left("deployment", "a.x");
        assert!(matches!(g.turn(), TxnTurn::Wait), "a.x brought its part");
        reg.member_left("other", "a.y");
        assert!(matches!(g.turn(), TxnTurn::Wait), "another stream's member");
        reg.member_left("deployment", "a.y");
        assert!(matches!(
            g.turn(),
            TxnTurn::Done(TxnOutcome::PerDocument(_))
        ));
        assert!(reg.find("deployment", &key(2)).is_some());
        let _ = reg.open("deployment", key(3));
        assert!(
            reg.find("deployment", &key(2)).is_none(),
            "finished groups are forgotten"
        );
    }

    #[test]
    fn an_excused_member_is_not_waited_for() {
        let reg = TxnRegistry::default();
        let g = reg.open("deployment", key(5));
        g.routed("a.x");
        g.routed("a.y");
        g.close();
        g.arrive(part("a.x"));
        assert!(matches!(g.turn(), TxnTurn::Wait));
        g.excuse("a.y");
        let TxnTurn::Execute(parts) = g.turn() else {
            panic!("the excused member is not waited for")
        };
        assert_eq!(parts.len(), 1);
        let lone = reg.open("deployment", key(6));
        lone.routed("a.y");
        lone.close();
        lone.excuse("a.y");
        assert!(lone.is_finished(), "nobody is left to write it");
    }

    #[test]
    fn a_group_without_members_is_finished_when_closed() {
        let reg = TxnRegistry::default();
        let g = reg.open("db", key(4));
        g.close();
        assert!(g.is_finished());
    }
}

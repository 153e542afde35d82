//! Who the source and the destination are, checked continuously (DESIGN §2.10), not only at
//! start: at start-up, at every worker (re)start, before every copied or repaired range is
//! written, and every [`IDENTITY_CHECK_INTERVAL`] from a background task.
//!
//! - **Source**: the replica set's `replicaSetId` (or set name + hosts, DESIGN §2.1) must stay
//!   the one recorded in the metadata. A source that changes under a running daemon (restored
//!   from an old backup, DNS now pointing at another cluster) trips the watch: every worker
//!   stops before it writes, and the daemon exits 78 as a fresh start would.
//! - **Destination**: its identity and a *metadata epoch* (a random id recorded in the
//!   metadata's identity document at first start) must stay what the daemon saw at start. A
//!   destination whose metadata vanished (databases dropped) or that was replaced trips the
//!   watch; the supervisor then follows `sync.on_destination_reset`.
//! - **Source = destination** under another host name (`localhost` vs `127.0.0.1`) is refused
//!   at start, by identity, before anything is written.

use std::{sync::Arc, time::Duration};

use bson::{doc, oid::ObjectId, DateTime, Document};
use mongodb::{Client, Collection};
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    bounded_write::BoundedWrites,
    checkpoint::CheckpointStore,
    config::OnDestinationReset,
    error::{ErrorKind, SyncError},
    metadata::{SourceIdentity, IDENTITY_COLLECTION},
    metrics::{Metrics, DESTINATION_RESETS_TOTAL, IDENTITY_MISMATCH},
    source::Source,
    status::StatusRegistry,
};

/// How often the background task re-reads both identities (DESIGN §2.9's `hello` period).
pub const IDENTITY_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on one background check, so an unreachable cluster never stalls the next one.
pub const IDENTITY_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Which side tripped the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// A tripped watch: which side and why (for the log line, status and `/readyz`).
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    pub side: Side,
    pub reason: String,
}

/// What a deployment says about itself: its identity and the `hello.me` of the member answering.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub identity: SourceIdentity,
    pub me: Option<String>,
}

impl Observed {
    /// Same deployment? By replica set id when both have one, else by the answering member's
    /// advertised name, else by set name plus a shared host — never by URI strings.
    pub fn same_deployment(&self, other: &Observed) -> bool {
        let (a, b) = (&self.identity, &other.identity);
        if let (Some(x), Some(y)) = (a.replica_set_id, b.replica_set_id) {
            return x == y;
        }
        if let (Some(x), Some(y)) = (&self.me, &other.me) {
            if x.eq_ignore_ascii_case(y) {
                return true;
            }
        }
        a.set_name.is_some()
            && a.set_name == b.set_name
            && a.hosts.iter().any(|h| b.hosts.contains(h))
    }
}

/// Reads a deployment's identity: `hello` (set name, hosts, me) and, where permitted,
/// `replSetGetConfig`'s `settings.replicaSetId`. Unlike [`Source::identity`], a deployment that
/// is not a replica set is not an error (a destination may be a standalone or a mongos).
pub async fn observe(client: &Client, area: ErrorKind) -> Result<Observed, SyncError> {
    let admin = client.database("admin");
    let hello = admin
        .run_command(doc! {"hello": 1})
        .await
        .map_err(|e| SyncError::mongo(area, "reading the deployment's identity (hello)", e))?;
    let mut hosts: Vec<String> = hello
        .get_array("hosts")
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str().map(str::to_lowercase))
                .collect()
        })
        .unwrap_or_default();
    hosts.sort();
    let set_name = hello.get_str("setName").ok().map(str::to_string);
    let me = hello.get_str("me").ok().map(str::to_lowercase);
    let replica_set_id = if set_name.is_some() {
        match admin.run_command(doc! {"replSetGetConfig": 1}).await {
            Ok(reply) => reply
                .get_document("config")
                .ok()
                .and_then(|c| c.get_document("settings").ok())
                .and_then(|s| s.get_object_id("replicaSetId").ok()),
            // Not permitted (no clusterMonitor role): name + hosts decide.
            Err(_) => None,
        }
    } else {
        None
    };
    Ok(Observed {
        identity: SourceIdentity {
            replica_set_id,
            set_name,
            hosts,
        },
        me,
    })
}

/// Refuses a destination that is the source under another name (exit 78, nothing written).
pub fn refuse_same_deployment(source: &Observed, dest: &Observed) -> Result<(), SyncError> {
    if source.same_deployment(dest) {
        return Err(SyncError::new(
            ErrorKind::Config,
            format!(
                "destination.uri reaches the same deployment as source.uri ({}), under another host name; the destination must be a different deployment",
                source.identity.describe()
            ),
        ));
    }
    Ok(())
}

fn meta_error(context: &str, e: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::DestinationConnection, context, e)
}

/// Before the identity is recorded: was this pipeline's metadata wiped under an earlier run that
/// then recreated checkpoints (no identity document, but checkpoints)? Such checkpoints point
/// past documents the destination no longer has. Returns `true` when they were discarded
/// (`recopy`); `stop` refuses to start.
pub async fn check_orphan_checkpoints(
    metadata_db: &mongodb::Database,
    checkpoints: &CheckpointStore,
    sync_id: &str,
    on_reset: OnDestinationReset,
) -> Result<bool, SyncError> {
    let stored = metadata_db
        .collection::<Document>(IDENTITY_COLLECTION)
        .find_one(doc! {"_id": sync_id})
        .await
        .map_err(|e| meta_error("reading the metadata identity", e))?;
    if stored.is_some() || checkpoints.list(sync_id).await?.is_empty() {
        return Ok(false);
    }
    // Read again: another instance (ha) may have recorded the identity and written its first
    // checkpoints between the two reads above.
    let recorded_since = metadata_db
        .collection::<Document>(IDENTITY_COLLECTION)
        .find_one(doc! {"_id": sync_id})
        .await
        .map_err(|e| meta_error("reading the metadata identity", e))?;
    if recorded_since.is_some() {
        return Ok(false);
    }
    match on_reset {
        OnDestinationReset::Stop => Err(SyncError::new(
            ErrorKind::DestinationReset,
            format!(
                "the destination has checkpoints of pipeline {sync_id:?} but no identity record: its metadata was wiped while a daemon ran, so the checkpoints point past documents the destination lost (sync.on_destination_reset = \"stop\"); run with --reset-identity to discard them and copy everything again"
            ),
        )),
        OnDestinationReset::Recopy => {
            checkpoints.delete_all(sync_id).await?;
            Ok(true)
        }
    }
}

/// The destination as recorded: its identity and the metadata epoch.
#[derive(Debug, Clone)]
struct DestinationRecord {
    identity: SourceIdentity,
    epoch: ObjectId,
}

/// The continuous identity check shared by the supervisor, the workers and a background task.
pub struct IdentityWatch {
    source: Source,
    dest: Client,
    identity: Collection<Document>,
    /// Writes to the identity document (bounded by `destination.socket_timeout_ms`).
    writes: BoundedWrites,
    sync_id: String,
    expected_source: SourceIdentity,
    expected_dest: Mutex<DestinationRecord>,
    tripped: Mutex<Option<Trip>>,
    notify: Notify,
    status: Arc<StatusRegistry>,
    mismatch: IntGaugeVec,
    resets: IntCounterVec,
}

impl IdentityWatch {
    /// Records (or adopts) the destination's identity and metadata epoch in the identity
    /// document, which [`crate::metadata::Metadata::check_identity`] has just written or matched.
    #[allow(clippy::too_many_arguments)]
    pub async fn establish(
        source: Source,
        dest: Client,
        metadata_db: &mongodb::Database,
        op_timeout: Option<Duration>,
        sync_id: &str,
        expected_source: SourceIdentity,
        observed_dest: &Observed,
        metrics: &Metrics,
        status: Arc<StatusRegistry>,
    ) -> Result<Arc<IdentityWatch>, SyncError> {
        let identity = metadata_db.collection::<Document>(IDENTITY_COLLECTION);
        let writes = BoundedWrites::new(metadata_db, op_timeout, ErrorKind::DestinationWrite);
        let stored = identity
            .find_one(doc! {"_id": sync_id})
            .await
            .map_err(|e| meta_error("reading the metadata epoch", e))?
            .unwrap_or_default();
        let recorded_dest = stored
            .get_document("destination")
            .ok()
            .map(SourceIdentity::from_document);
        let epoch = match stored.get_object_id("epoch") {
            Ok(epoch) => {
                if recorded_dest
                    .as_ref()
                    .is_some_and(|r| !r.matches(&observed_dest.identity))
                {
                    tracing::warn!(destination = %observed_dest.identity.describe(), "the metadata was recorded on another destination deployment (restored from a backup?); adopting it");
                }
                epoch
            }
            Err(_) => {
                // Several instances may start together (ha.partitions): the first epoch
                // written wins and every one adopts it, or each would take the others' for a
                // reset of the destination.
                writes
                    .update(
                        IDENTITY_COLLECTION,
                        doc! {"_id": sync_id, "epoch": {"$exists": false}},
                        doc! {"$set": {"epoch": ObjectId::new()}},
                        false,
                        "recording the metadata epoch",
                    )
                    .await?;
                identity
                    .find_one(doc! {"_id": sync_id})
                    .await
                    .map_err(|e| meta_error("reading the metadata epoch", e))?
                    .and_then(|d| d.get_object_id("epoch").ok())
                    .ok_or_else(|| {
                        SyncError::new(
                            ErrorKind::DestinationWrite,
                            "the metadata epoch was not recorded (the identity record is missing)",
                        )
                    })?
            }
        };
        writes
            .update(
                IDENTITY_COLLECTION,
                doc! {"_id": sync_id},
                doc! {"$set": {"destination": observed_dest.identity.to_document()}},
                true,
                "recording the destination's identity",
            )
            .await?;
        let (mismatch, resets) = register_metrics(metrics);
        Ok(Arc::new(IdentityWatch {
            source,
            dest,
            identity,
            writes,
            sync_id: sync_id.to_string(),
            expected_source,
            expected_dest: Mutex::new(DestinationRecord {
                identity: observed_dest.identity.clone(),
                epoch,
            }),
            tripped: Mutex::new(None),
            notify: Notify::new(),
            status,
            mismatch,
            resets,
        }))
    }

    /// The trip, if any.
    pub fn tripped(&self) -> Option<Trip> {
        self.tripped.lock().clone()
    }

    /// Resolves when the watch trips (a trip while nobody waits is kept for the next wait).
    pub async fn wait_tripped(&self) -> Trip {
        loop {
            if let Some(t) = self.tripped() {
                return t;
            }
            self.notify.notified().await;
        }
    }

    fn error_for(trip: &Trip) -> SyncError {
        match trip.side {
            Side::Source => SyncError::new(ErrorKind::SourceIdentityMismatch, trip.reason.clone()),
            Side::Destination => SyncError::new(ErrorKind::DestinationReset, trip.reason.clone()),
        }
    }

    fn trip(&self, side: Side, reason: String) -> SyncError {
        let trip = {
            let mut current = self.tripped.lock();
            match &*current {
                Some(existing) => existing.clone(),
                None => {
                    let trip = Trip { side, reason };
                    *current = Some(trip.clone());
                    tracing::error!(side = side.as_str(), reason = %trip.reason, "{} identity changed while running; stopping every worker before it writes", side.as_str());
                    self.mismatch.with_label_values(&[side.as_str()]).set(1);
                    self.status.set_safety_alarm(Some(format!(
                        "{} identity mismatch: {}",
                        side.as_str(),
                        trip.reason
                    )));
                    trip
                }
            }
        };
        self.notify.notify_one();
        Self::error_for(&trip)
    }

    /// Checks the source: still the recorded deployment?
    pub async fn verify_source(&self) -> Result<(), SyncError> {
        if let Some(t) = self.tripped() {
            return Err(Self::error_for(&t));
        }
        let observed = observe(self.source.client(), ErrorKind::SourceConnection).await?;
        if !observed.identity.matches(&self.expected_source) {
            return Err(self.trip(
                Side::Source,
                format!(
                    "the source is now {} but pipeline {:?} was started against {}",
                    observed.identity.describe(),
                    self.sync_id,
                    self.expected_source.describe()
                ),
            ));
        }
        Ok(())
    }

    /// Checks the destination: same deployment, metadata epoch still there and unchanged?
    pub async fn verify_destination(&self) -> Result<(), SyncError> {
        if let Some(t) = self.tripped() {
            return Err(Self::error_for(&t));
        }
        let expected = self.expected_dest.lock().clone();
        let stored = self
            .identity
            .find_one(doc! {"_id": &self.sync_id})
            .await
            .map_err(|e| meta_error("reading the metadata epoch", e))?;
        let reason = match stored.as_ref().map(|d| d.get_object_id("epoch")) {
            None => Some("the metadata identity record vanished (metadata database dropped?)".to_string()),
            Some(Err(_)) => Some("the metadata identity record lost its epoch".to_string()),
            Some(Ok(epoch)) if epoch != expected.epoch => Some(format!(
                "the metadata epoch changed from {} to {epoch} (another daemon reset it, or it was restored)",
                expected.epoch
            )),
            Some(Ok(_)) => None,
        };
        let reason = match reason {
            Some(r) => Some(r),
            None => {
                let observed = observe(&self.dest, ErrorKind::DestinationConnection).await?;
                (!observed.identity.matches(&expected.identity)).then(|| {
                    format!(
                        "the destination is now {} but was {}",
                        observed.identity.describe(),
                        expected.identity.describe()
                    )
                })
            }
        };
        match reason {
            Some(r) => Err(self.trip(Side::Destination, r)),
            None => Ok(()),
        }
    }

    /// Both sides; the first mismatch or read error is returned.
    pub async fn verify(&self) -> Result<(), SyncError> {
        self.verify_source().await?;
        self.verify_destination().await
    }

    /// After a destination reset handled by re-copying: the destination as it is now becomes
    /// the recorded one, with a new epoch, and the watch is cleared.
    pub async fn rebase_destination(&self) -> Result<(), SyncError> {
        let observed = observe(&self.dest, ErrorKind::DestinationConnection).await?;
        let epoch = ObjectId::new();
        let mut record = self.expected_source.to_document();
        record.insert("_id", &self.sync_id);
        record.insert("recorded_at", DateTime::now());
        record.insert("epoch", epoch);
        record.insert("destination", observed.identity.to_document());
        self.writes
            .replace(
                IDENTITY_COLLECTION,
                doc! {"_id": &self.sync_id},
                record,
                true,
                "recording the metadata epoch",
            )
            .await?;
        *self.expected_dest.lock() = DestinationRecord {
            identity: observed.identity,
            epoch,
        };
        *self.tripped.lock() = None;
        self.mismatch
            .with_label_values(&[Side::Destination.as_str()])
            .set(0);
        self.status.set_safety_alarm(None);
        Ok(())
    }

    /// Counts a destination reset handled with `action`.
    pub fn count_reset(&self, action: OnDestinationReset) {
        self.resets.with_label_values(&[reset_label(action)]).inc();
    }

    /// Re-checks both identities every [`IDENTITY_CHECK_INTERVAL`] and whenever a client
    /// (re)connects (`reconnected`, see [`notify_on_reconnect`]) until `cancel`; unreachable
    /// clusters are left to the connectivity probe (they are not a mismatch).
    pub fn spawn_periodic(self: &Arc<Self>, cancel: CancellationToken, reconnected: Arc<Notify>) {
        let watch = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDENTITY_CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                    _ = reconnected.notified() => {}
                }
                if watch.tripped().is_some() {
                    continue;
                }
                match tokio::time::timeout(IDENTITY_CHECK_TIMEOUT, watch.verify()).await {
                    Ok(Err(e))
                        if !matches!(
                            e.kind,
                            ErrorKind::SourceIdentityMismatch | ErrorKind::DestinationReset
                        ) =>
                    {
                        tracing::debug!(error = %e, "identity check could not run");
                    }
                    _ => {}
                }
            }
        });
    }
}

/// Makes the client signal `notify` whenever a server it had lost answers again (the driver's
/// monitor saw it `Unknown`, then known): a (re)connection, possibly to another deployment.
pub fn notify_on_reconnect(options: &mut mongodb::options::ClientOptions, notify: Arc<Notify>) {
    use mongodb::{
        event::{sdam::SdamEvent, EventHandler},
        ServerType,
    };
    options.sdam_event_handler = Some(EventHandler::callback(move |event: SdamEvent| {
        if let SdamEvent::ServerDescriptionChanged(change) = event {
            if change.previous_description.server_type() == ServerType::Unknown
                && change.new_description.server_type() != ServerType::Unknown
            {
                notify.notify_one();
            }
        }
    }));
}

fn reset_label(action: OnDestinationReset) -> &'static str {
    match action {
        OnDestinationReset::Recopy => "recopy",
        OnDestinationReset::Stop => "stop",
    }
}

/// Registers (once per registry) the identity gauge and the reset counter, every label value at 0.
pub(crate) fn register_metrics(metrics: &Metrics) -> (IntGaugeVec, IntCounterVec) {
    let mismatch = IntGaugeVec::new(
        Opts::new(
            IDENTITY_MISMATCH,
            "1 while the source or destination is not the deployment recorded at start (by side).",
        ),
        &["side"],
    )
    .expect("valid metric");
    for side in [Side::Source, Side::Destination] {
        mismatch.with_label_values(&[side.as_str()]).set(0);
    }
    let resets = IntCounterVec::new(
        Opts::new(
            DESTINATION_RESETS_TOTAL,
            "Destinations found wiped or replaced while running, by the action taken (sync.on_destination_reset).",
        ),
        &["action"],
    )
    .expect("valid metric");
    for action in [OnDestinationReset::Recopy, OnDestinationReset::Stop] {
        resets.with_label_values(&[reset_label(action)]);
    }
    // A second registration (a new active term, a daemon restarted in-process) replaces the
    // first, so the series are the ones this watch sets.
    metrics.register_replacing(mismatch.clone());
    metrics.register_replacing(resets.clone());
    (mismatch, resets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(
        id: Option<ObjectId>,
        set: Option<&str>,
        hosts: &[&str],
        me: Option<&str>,
    ) -> Observed {
        Observed {
            identity: SourceIdentity {
                replica_set_id: id,
                set_name: set.map(str::to_string),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
            },
            me: me.map(str::to_string),
        }
    }

    #[test]
    fn one_deployment_under_two_names_is_the_same() {
        let id = ObjectId::new();
        let a = observed(Some(id), Some("rs0"), &["127.0.0.1:1"], Some("127.0.0.1:1"));
        let b = observed(Some(id), Some("rs0"), &["127.0.0.1:1"], Some("127.0.0.1:1"));
        assert!(a.same_deployment(&b));
        // Without replSetGetConfig: the answering member decides.
        let a = observed(None, Some("rs0"), &["h:1"], Some("h:1"));
        let b = observed(None, None, &[], Some("H:1"));
        assert!(a.same_deployment(&b));
        // Or a shared host of one set name.
        let b = observed(None, Some("rs0"), &["h:1", "h:2"], Some("h:2"));
        assert!(a.same_deployment(&b));
    }

    #[test]
    fn two_sets_with_one_name_are_different() {
        let a = observed(Some(ObjectId::new()), Some("rs0"), &["h:1"], Some("h:1"));
        let b = observed(Some(ObjectId::new()), Some("rs0"), &["h:1"], Some("h:1"));
        assert!(
            !a.same_deployment(&b),
            "replica set ids decide when both are known"
        );
        let a = observed(None, Some("rs0"), &["a:1"], Some("a:1"));
        let b = observed(None, Some("rs0"), &["b:1"], Some("b:1"));
        assert!(!a.same_deployment(&b));
    }
}

//! The daemon's configuration (DESIGN §3): serde structs with named defaults, explicit
//! validation with field-path errors, and a redacted twin for printing.
//!
//! Loading (file → environment → secret files) is in [`load`]; patterns and renames in
//! [`namespace`]; secrets in [`secret`].
//!
//! The root [`Config`] deliberately does not implement `Serialize`: print it through
//! [`Config::redacted`], which replaces credentials with `***`.

pub mod load;
pub mod namespace;
pub mod partition;
pub mod secret;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use mongodb::options::{
    Acknowledgment, ClientOptions, ConnectionString, HostInfo, ServerAddress, Tls, TlsOptions,
    WriteConcern,
};
use serde::{Deserialize, Serialize};

pub use self::{
    load::{load, load_from_str, load_from_str_with_env, load_with_env, ConfigError, FieldError},
    namespace::{NamespaceFilter, NamespacePattern, RenameMap},
    secret::{redact_text, redact_uri, Secret},
};
use self::{
    namespace::{check_db_name, is_reserved_db, SYSTEM_COLLECTION_PREFIX, SYSTEM_DATABASES},
    secret::{lenient_opt_string, lenient_string},
};

// ---------------------------------------------------------------------------------------------
// Defaults. Each one says why; `config/mongo-syncd.toml` mirrors them.
// ---------------------------------------------------------------------------------------------

/// Where `run`, `check-config` and `validate` look for the config file without `--config`
/// (the FHS location a package or the systemd unit installs).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mongo-syncd/mongo-syncd.toml";

/// The `appName` the daemon announces, so its connections are recognisable in `currentOp`,
/// server logs and Atlas metrics.
pub const DEFAULT_APP_NAME: &str = "mongo-syncd";
/// The connection pool has to hold one awaiting change-stream `getMore` per synced namespace plus
/// the copy, lookup and validation reads; the driver's default of 10 would serialise namespaces
/// behind each other as soon as more than a handful are synced.
pub const DEFAULT_MAX_POOL_SIZE: u32 = 100;
/// Default `source.collection_streams_max`: beyond this many namespaces, `auto` reads one
/// deployment stream instead of one stream per collection.
pub const DEFAULT_COLLECTION_STREAMS_MAX: usize = 16;
/// Upper bound of `source.collection_streams_max`.
pub const MAX_COLLECTION_STREAMS_MAX: usize = 100_000;
/// No idle connections are kept open on purpose: the pool grows on demand and the awaiting
/// change streams keep the connections they need warm anyway.
pub const DEFAULT_MIN_POOL_SIZE: u32 = 0;
/// Pooled connections unused this long are closed: a burst (1,000 namespaces copying and
/// catching up at start, a validation pass) does not leave its connections open on the source
/// for good, while the connections in steady use (a shared stream's awaiting `getMore`, the
/// checkpoint writes) never sit idle that long.
pub const DEFAULT_MAX_IDLE_TIME_MS: u64 = 30_000;
/// The driver's default: long enough for a TLS handshake across regions, short enough that an
/// unreachable host is reported before the server selection timeout.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// The driver's default; it outlasts a replica-set election (typically under 12 s), so a primary
/// change is ridden out inside one operation instead of becoming a worker restart.
pub const DEFAULT_SERVER_SELECTION_TIMEOUT_MS: u64 = 30_000;
/// Verifying server certificates is the only safe default; turning it off is an explicit,
/// visible choice for lab set-ups.
pub const DEFAULT_TLS_ALLOW_INVALID_CERTIFICATES: bool = false;

/// Names the pipeline in checkpoints, journals and validation records; `"default"` suits the
/// common case of one daemon per destination.
pub const DEFAULT_SYNC_ID: &str = "default";
/// Everything that is not a system or metadata namespace, which is what a DR copy wants.
pub const DEFAULT_NAMESPACES: &[&str] = &["*.*"];
/// Losing the oplog position should heal itself: re-copy the namespace rather than stop.
pub const DEFAULT_ON_HISTORY_LOST: OnHistoryLost = OnHistoryLost::Resync;
/// A destination wiped or replaced under a running daemon is healed by copying everything
/// again: a disaster-recovery copy with holes is worse than a copy that takes time.
pub const DEFAULT_ON_DESTINATION_RESET: OnDestinationReset = OnDestinationReset::Recopy;
/// A copy, force-sync or repair may delete at most half of a namespace's destination documents
/// before an operator confirms: legitimate drift is small, a replaced or emptied source is not.
pub const DEFAULT_MAX_DELETE_FRACTION: f64 = 0.5;
/// A namespace without a checkpoint is copied first; otherwise the destination would miss all
/// documents written before the daemon started.
pub const DEFAULT_INITIAL_COPY: InitialCopy = InitialCopy::Auto;

/// Large enough to amortise a bulk-write round trip, small enough that one batch's latency and
/// memory stay modest.
pub const DEFAULT_BATCH_MAX_EVENTS: u32 = 1000;
/// 8 MiB: half the maximum document size, so a batch of typical documents stays well below the
/// server's 48 MB message limit and the reader never holds much memory per namespace.
pub const DEFAULT_BATCH_MAX_BYTES: u64 = 8_388_608;
/// Waiting 20 ms for more events lets bursts share one bulk write while adding at most 20 ms of
/// lag to a quiet stream.
pub const DEFAULT_BATCH_MAX_WAIT_MS: u64 = 20;
/// Delta updates replay exactly what changed and need no extra reads on the source.
pub const DEFAULT_UPDATE_MODE: UpdateMode = UpdateMode::Delta;
/// The server rejects bulk writes of more than 100,000 statements (`maxWriteBatchSize`).
pub const MAX_BATCH_MAX_EVENTS: u32 = 100_000;
/// Below 1 MiB batching stops paying for itself; one event always fits a batch regardless.
pub const MIN_BATCH_MAX_BYTES: u64 = 1_048_576;
/// The server's `maxMessageSizeBytes` (48,000,000): a larger batch would be split by the driver
/// anyway and would only cost memory.
pub const MAX_BATCH_MAX_BYTES: u64 = 48_000_000;
/// Default `apply.max_buffered_bytes`: 256 MiB of change events read ahead, all namespaces.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 256 * 1024 * 1024;
/// The budget's ceiling (a tokio semaphore's permit limit is far above it).
pub const MAX_MAX_BUFFERED_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// Default `copy.concurrent_collections`. Each copy holds two ranges (one written, one read
/// ahead, up to 16 MiB each) and a few connections; four keep a destination busy without letting
/// memory and connections grow with the number of namespaces (1,000 new collections would
/// otherwise open 1,000 copies at once).
pub const DEFAULT_COPY_CONCURRENT_COLLECTIONS: u32 = 4;
/// Upper bound of `copy.concurrent_collections`.
pub const MAX_COPY_CONCURRENT_COLLECTIONS: u32 = 256;
/// Default `copy.parallel_ranges`: range lanes one large collection is copied with.
pub const DEFAULT_COPY_PARALLEL_RANGES: u32 = 4;
/// Upper bound of `copy.parallel_ranges`.
pub const MAX_COPY_PARALLEL_RANGES: u32 = 64;
/// Waiting longer than a minute for a batch to fill only adds lag.
pub const MAX_BATCH_MAX_WAIT_MS: u64 = 60_000;
pub const MAX_WRITE_LANES: u32 = 16;

/// The metadata database on the destination; named after the daemon so operators recognise it.
pub const DEFAULT_CHECKPOINT_DATABASE: &str = "mongo_syncd";
/// An idle namespace's `postBatchResumeToken` is saved every second, so a quiet collection never
/// falls off the oplog and a restart replays at most about a second of events.
pub const DEFAULT_CHECKPOINT_INTERVAL_SECONDS: u64 = 1;

/// Source-wins is the only policy under which values provably converge (DESIGN §2.4).
pub const DEFAULT_CONFLICT_POLICY: ConflictPolicy = ConflictPolicy::SourceWins;
/// No version field unless a policy needs one.
pub const DEFAULT_CONFLICT_FIELD: &str = "";
/// Skipped writes are kept for inspection by default: silently discarding data is worse than a
/// small collection in the metadata database.
pub const DEFAULT_CONFLICT_JOURNAL: bool = true;
/// Enabling pre-images adds a write to every source update and delete; the daemon only does that
/// when told to.
pub const DEFAULT_ENABLE_PRE_IMAGES: bool = false;

/// Every 10 minutes: frequent enough to catch drift within a working session, rare enough that
/// hashing large collections does not compete with replication.
pub const DEFAULT_VALIDATION_INTERVAL_SECONDS: u64 = 600;
/// Hashes find content drift, counts alone cannot.
pub const DEFAULT_VALIDATION_MODE: ValidationMode = ValidationMode::Hash;
/// Validation reports; changing data is an explicit operator decision.
pub const DEFAULT_VALIDATION_REPAIR: bool = false;
/// 0 = unthrottled; throttle when the source cannot afford the extra reads.
pub const DEFAULT_VALIDATION_MAX_DOCS_PER_SECOND: u64 = 0;
/// Field order only changes after pipeline updates that reorder fields, which applications
/// rarely care about.
pub const DEFAULT_VALIDATION_STRICT_ORDER: bool = false;

/// Ten consecutive failures with capped backoff span several minutes: enough to ride out an
/// election or a network blip, short enough that a persistent fault is parked and visible.
pub const DEFAULT_MAX_RESTARTS: u32 = 10;
/// A minute between retries keeps a recovering cluster from being hammered while bounding how
/// long a fixed fault goes unnoticed.
pub const DEFAULT_MAX_BACKOFF_SECONDS: u64 = 60;

/// Loopback only: the API can trigger force-syncs, so exposing it is a deliberate choice. The
/// port is the one DESIGN §3 fixes, in the 9100-9999 range Prometheus exporters customarily use.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9290";

/// 30 s is well above normal batching lag yet short enough for a DR recovery-point objective.
pub const DEFAULT_MAX_LAG_SECONDS: u64 = 30;

/// Caps the metrics series count for deployments with very many collections; the rest aggregate
/// under `namespace="_other"`.
pub const DEFAULT_METRICS_MAX_NAMESPACES: usize = 500;

/// `info` logs lifecycle events (start, copy done, parked, shutdown) without per-event noise.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Human-readable on a terminal; production configs switch to `json` for log shippers.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;

/// Long enough to finish and checkpoint in-flight batches, shorter than systemd's default
/// `TimeoutStopSec` (90 s) so the daemon stops itself before it is killed.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: u64 = 30;
/// `runtime.worker_threads`: 0 = `TOKIO_WORKER_THREADS` when set, else one per usable CPU.
pub const DEFAULT_WORKER_THREADS: usize = 0;
/// `ha.lease_seconds`: a dead active is replaced within a lease and a renew period.
pub const DEFAULT_HA_LEASE_SECONDS: u64 = 15;
/// The shortest lease: renewals every second leave room for one failed renewal.
pub const MIN_HA_LEASE_SECONDS: u64 = 3;

// ---------------------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------------------

/// What to do when a namespace's resume token is no longer in the source oplog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnHistoryLost {
    /// Re-run the initial copy for that namespace (parked after 2 consecutive re-copies).
    Resync,
    /// Park the namespace's worker and wait for an operator.
    Park,
}

/// What to do when the destination's metadata vanishes or the destination is replaced while
/// the daemon runs (DESIGN §2.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDestinationReset {
    /// Stop every worker, discard the checkpoints and copy every namespace again.
    Recopy,
    /// Stop every worker and exit 78 for an operator to decide.
    Stop,
}

/// Whether a namespace without a checkpoint is copied before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitialCopy {
    /// Copy, then stream (DESIGN §2.3).
    Auto,
    /// Stream only, for destinations seeded from a backup.
    Skip,
}

/// What to do when a destination collection's collation differs from its source collection's
/// (DESIGN §2.10): copying into it would walk another `_id` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCollationMismatch {
    /// Park the namespace with reason `collation_mismatch`, naming both collations.
    Park,
    /// Drop the destination collection and create it with the source's options.
    Recreate,
}

/// `source.stream_scope` (DESIGN §2.11): which change streams the daemon reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamScope {
    /// Collection streams up to `source.collection_streams_max` namespaces, one deployment
    /// stream beyond.
    #[default]
    Auto,
    /// One change stream per collection (v1).
    Collection,
    /// One shared change stream per source database.
    Database,
    /// One shared change stream for the whole deployment.
    Deployment,
}

impl StreamScope {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamScope::Auto => "auto",
            StreamScope::Collection => "collection",
            StreamScope::Database => "database",
            StreamScope::Deployment => "deployment",
        }
    }
}

/// `apply.write_lanes`: how many concurrent commands one batch's writes (which address distinct
/// documents) are cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteLanes {
    /// Each worker measures its writes and keeps the count, 1..=[`MAX_WRITE_LANES`], that writes
    /// fastest: a server with document-level concurrency runs lanes in parallel; one that runs
    /// writes one at a time (or is saturated) only pays for the extra round trips.
    #[default]
    Auto,
    /// Always this many (1..=[`MAX_WRITE_LANES`]).
    Fixed(u32),
}

impl WriteLanes {
    /// Parsed from TOML, or an environment variable: `"auto"` or a number.
    fn parse(value: WriteLanesRepr) -> Result<WriteLanes, String> {
        match value {
            WriteLanesRepr::Count(n) => u32::try_from(n)
                .map(WriteLanes::Fixed)
                .map_err(|_| format!("must be \"auto\" or between 1 and {MAX_WRITE_LANES}")),
            WriteLanesRepr::Word(w) if w == "auto" => Ok(WriteLanes::Auto),
            WriteLanesRepr::Word(w) => Err(format!(
                "must be \"auto\" or between 1 and {MAX_WRITE_LANES}, not {w:?}"
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WriteLanesRepr {
    Count(i64),
    Word(String),
}

impl<'de> Deserialize<'de> for WriteLanes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WriteLanes, D::Error> {
        WriteLanes::parse(WriteLanesRepr::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for WriteLanes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WriteLanes::Auto => s.serialize_str("auto"),
            WriteLanes::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

/// `apply.transactions`: how the events of one source transaction are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransactionMode {
    /// Every document on its own, batched with the other events (v1).
    #[default]
    PerDocument,
    /// The events of one source transaction (same `lsid` + `txnNumber`, across collections)
    /// are written in one destination transaction, so readers never see part of it.
    Atomic,
}

impl TransactionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionMode::PerDocument => "per-document",
            TransactionMode::Atomic => "atomic",
        }
    }
}

/// How update events are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateMode {
    /// Apply `updateDescription` deltas (`fullDocument: default`).
    Delta,
    /// Replace with the looked-up document (`fullDocument: updateLookup`).
    Lookup,
}

/// Conflict policies (DESIGN §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// The source's write is applied; conflicts are neither detected nor counted.
    SourceWins,
    /// Apply only if the destination still equals the source's pre-image.
    DestinationWins,
    /// Apply if the source's date in `field` is newer or equal.
    NewestWins,
    /// Apply if the source's number in `field` is greater or equal.
    VersionWins,
    /// Destination-wins with every skipped write journaled.
    Journal,
}

impl ConflictPolicy {
    /// The policy's config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::SourceWins => "source-wins",
            ConflictPolicy::DestinationWins => "destination-wins",
            ConflictPolicy::NewestWins => "newest-wins",
            ConflictPolicy::VersionWins => "version-wins",
            ConflictPolicy::Journal => "journal",
        }
    }

    /// Whether the policy compares `conflict.field`.
    pub fn needs_field(self) -> bool {
        matches!(
            self,
            ConflictPolicy::NewestWins | ConflictPolicy::VersionWins
        )
    }

    /// Whether the policy needs pre-images on the source collections.
    pub fn needs_pre_images(self) -> bool {
        matches!(
            self,
            ConflictPolicy::DestinationWins | ConflictPolicy::Journal
        )
    }
}

/// Validation depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValidationMode {
    /// Count + order-independent digest per `_id` range.
    Hash,
    /// Counts only.
    Count,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

/// The root of the configuration. Not `Serialize`: use [`Config::redacted`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[source]`: the deployment read with change streams.
    #[serde(default)]
    pub source: EndpointConfig,
    /// `[destination]`: the deployment written to; also holds the metadata database.
    #[serde(default)]
    pub destination: EndpointConfig,
    /// `[sync]`
    #[serde(default)]
    pub sync: SyncConfig,
    /// `[apply]`
    #[serde(default)]
    pub apply: ApplyConfig,
    /// `[copy]`
    #[serde(default)]
    pub copy: CopyConfig,
    /// `[checkpoint]`
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// `[conflict]`
    #[serde(default)]
    pub conflict: ConflictConfig,
    /// `[validation]`
    #[serde(default)]
    pub validation: ValidationConfig,
    /// `[supervisor]`
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    /// `[http]`
    #[serde(default)]
    pub http: HttpConfig,
    /// `[health]`
    #[serde(default)]
    pub health: HealthConfig,
    /// `[metrics]`
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[log]`
    #[serde(default)]
    pub log: LogConfig,
    /// `[shutdown]`
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// `[runtime]`: the process's async runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `[ha]`: several instances, one copy (DESIGN §2.12).
    #[serde(default)]
    pub ha: HaConfig,
    /// Problems worth a warning that do not make the config invalid (e.g. a credential file
    /// readable by group or others). Filled by [`load`](self::load); logged at start-up and
    /// printed by `check-config`. Never contains secret values.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// `[source]` and `[destination]`: where to connect, plus driver options passed through.
///
/// Driver options set here win over the same option in the URI; an option set in neither place
/// takes the `DEFAULT_*` value.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// `mongodb://` or `mongodb+srv://` connection string. Exactly one of `uri` and `uri_file`.
    #[serde(default)]
    pub uri: Option<Secret<String>>,
    /// File holding the connection string (trimmed), e.g. a systemd credential.
    #[serde(default)]
    pub uri_file: Option<PathBuf>,
    /// `appName` (default [`DEFAULT_APP_NAME`]).
    #[serde(default, deserialize_with = "lenient_opt_string")]
    pub app_name: Option<String>,
    /// `maxPoolSize` (default [`DEFAULT_MAX_POOL_SIZE`]).
    #[serde(default)]
    pub max_pool_size: Option<u32>,
    /// `minPoolSize` (default [`DEFAULT_MIN_POOL_SIZE`]).
    #[serde(default)]
    pub min_pool_size: Option<u32>,
    /// `maxIdleTimeMS` (default [`DEFAULT_MAX_IDLE_TIME_MS`]; 0 = never closed for idleness).
    #[serde(default)]
    pub max_idle_time_ms: Option<u64>,
    /// `connectTimeoutMS` (default [`DEFAULT_CONNECT_TIMEOUT_MS`]).
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// `serverSelectionTimeoutMS` (default [`DEFAULT_SERVER_SELECTION_TIMEOUT_MS`]).
    #[serde(default)]
    pub server_selection_timeout_ms: Option<u64>,
    /// Upper bound for one non-awaiting operation. The Rust driver has no socket timeout, so
    /// this is not passed to the driver: callers read [`EndpointConfig::socket_timeout`] and wrap
    /// reads/writes (never awaiting change-stream `getMore`s) in a timeout. Unset = no bound.
    #[serde(default)]
    pub socket_timeout_ms: Option<u64>,
    /// `tlsCAFile`; setting any `tls_*` key enables TLS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `tlsCertificateKeyFile` (client certificate and key, PEM).
    #[serde(default)]
    pub tls_certificate_key_file: Option<PathBuf>,
    /// `tlsAllowInvalidCertificates`; `true` here or in the URI disables verification.
    #[serde(default)]
    pub tls_allow_invalid_certificates: bool,
    /// `source.stream_scope` (default `auto`); `[source]` only.
    #[serde(default)]
    pub stream_scope: Option<StreamScope>,
    /// `source.collection_streams_max` (default [`DEFAULT_COLLECTION_STREAMS_MAX`]): under
    /// `auto`, the most namespaces read with their own collection streams; `[source]` only.
    #[serde(default)]
    pub collection_streams_max: Option<usize>,
    /// The URI read from `uri_file` by the loader.
    #[serde(skip)]
    pub(crate) uri_from_file: Option<Secret<String>>,
}

/// A cluster time for `sync.start_at_operation_time`.
///
/// Written either as a table `{ t = <seconds>, i = <increment> }` (exactly a BSON timestamp, as
/// printed by `mongosh`) or as a plain integer number of Unix seconds, meaning `{ t = N, i = 0 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OperationTime {
    /// Seconds since the Unix epoch.
    pub t: u32,
    /// Ordinal within the second.
    pub i: u32,
}

impl OperationTime {
    /// As a BSON timestamp, for `startAtOperationTime`.
    pub fn to_timestamp(self) -> bson::Timestamp {
        bson::Timestamp {
            time: self.t,
            increment: self.i,
        }
    }
}

impl<'de> Deserialize<'de> for OperationTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};

        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OperationTime;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("{ t = <seconds>, i = <increment> } or an integer number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OperationTime, E> {
                let t = u32::try_from(v).map_err(|_| E::custom("seconds out of range"))?;
                Ok(OperationTime { t, i: 0 })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OperationTime, E> {
                let t = u32::try_from(v).map_err(|_| E::custom("seconds out of range"))?;
                Ok(OperationTime { t, i: 0 })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OperationTime, A::Error> {
                let (mut t, mut i) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "t" => t = Some(map.next_value::<u32>()?),
                        "i" => i = Some(map.next_value::<u32>()?),
                        other => return Err(de::Error::unknown_field(other, &["t", "i"])),
                    }
                }
                Ok(OperationTime {
                    t: t.ok_or_else(|| de::Error::missing_field("t"))?,
                    i: i.unwrap_or(0),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `[sync]`: what is synced and how it starts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Pipeline name; keys checkpoints, journals and validation records.
    #[serde(default = "default_sync_id", deserialize_with = "lenient_string")]
    pub id: String,
    /// Include patterns.
    #[serde(default = "default_namespaces")]
    pub namespaces: Vec<NamespacePattern>,
    /// Exclude patterns (win over includes).
    #[serde(default)]
    pub exclude: Vec<NamespacePattern>,
    /// Source `db` or `db.coll` → destination name.
    #[serde(default, skip_serializing_if = "RenameMap::is_empty")]
    pub rename: RenameMap,
    /// `resync` or `park`.
    #[serde(default = "default_on_history_lost")]
    pub on_history_lost: OnHistoryLost,
    /// `recopy` or `stop`.
    #[serde(default = "default_on_destination_reset")]
    pub on_destination_reset: OnDestinationReset,
    /// Largest fraction of a namespace's destination documents a copy, force-sync or repair
    /// deletes without an operator's confirmation, in (0, 1]; 1 turns the guard off.
    #[serde(default = "default_max_delete_fraction")]
    pub max_delete_fraction: f64,
    /// `auto` or `skip`.
    #[serde(default = "default_initial_copy")]
    pub initial_copy: InitialCopy,
    /// With `initial_copy = "skip"`: where the first stream starts (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_operation_time: Option<OperationTime>,
    /// `park` or `recreate`.
    #[serde(default = "default_on_collation_mismatch")]
    pub on_collation_mismatch: OnCollationMismatch,
}

/// `[apply]`: batching of destination writes (write concern is always majority, journaled).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Events per bulk write, 1..=[`MAX_BATCH_MAX_EVENTS`].
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: u32,
    /// Bytes per batch, [`MIN_BATCH_MAX_BYTES`]..=[`MAX_BATCH_MAX_BYTES`].
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: u64,
    /// How long a partial batch waits for more events, counted from when its first event was
    /// read, 0..=[`MAX_BATCH_MAX_WAIT_MS`].
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// `delta` or `lookup`.
    #[serde(default = "default_update_mode")]
    pub update_mode: UpdateMode,
    /// Change-event bytes read ahead and not yet applied, for the whole daemon
    /// ([`crate::source::buffer_budget`]); `batch_max_bytes`..=[`MAX_MAX_BUFFERED_BYTES`].
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: u64,
    /// `per-document` (default) or `atomic` (DESIGN §2.4): how the events of one source
    /// transaction reach the destination.
    #[serde(default)]
    pub transactions: TransactionMode,
    /// Concurrent bulk commands one batch's writes are cut into: `auto` (measured per worker)
    /// or 1..=[`MAX_WRITE_LANES`].
    #[serde(default)]
    pub write_lanes: WriteLanes,
}

/// `[copy]`: initial copies, re-copies and force-syncs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CopyConfig {
    /// Namespaces copied at once, 1..=[`MAX_COPY_CONCURRENT_COLLECTIONS`]; the others wait
    /// for a slot in the `copying` state.
    #[serde(default = "default_copy_concurrent_collections")]
    pub concurrent_collections: u32,
    /// `_id` range lanes one collection is copied with at once, 1..=[`MAX_COPY_PARALLEL_RANGES`]
    /// (a collection gets at most one lane per full range of documents it holds).
    #[serde(default = "default_copy_parallel_ranges")]
    pub parallel_ranges: u32,
}

/// `[checkpoint]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Metadata database on the destination (checkpoints, dead letters, conflicts, validations).
    #[serde(
        default = "default_checkpoint_database",
        deserialize_with = "lenient_string"
    )]
    pub database: String,
    /// Idle-namespace checkpoint interval.
    #[serde(default = "default_checkpoint_interval_seconds")]
    pub interval_seconds: u64,
}

/// One `[[conflict.rules]]` entry: a per-namespace policy override.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictRule {
    /// Source namespace patterns this rule applies to.
    pub namespaces: Vec<NamespacePattern>,
    /// The policy for them.
    pub policy: ConflictPolicy,
    /// Version/date field; falls back to `conflict.field`.
    #[serde(
        default,
        deserialize_with = "lenient_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub field: Option<String>,
}

/// `[conflict]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictConfig {
    /// Default policy.
    #[serde(default = "default_conflict_policy")]
    pub policy: ConflictPolicy,
    /// Field compared by `newest-wins` / `version-wins` (dotted path allowed).
    #[serde(
        default = "default_conflict_field",
        deserialize_with = "lenient_string"
    )]
    pub field: String,
    /// Record non-applied conflicts in `<metadata>.conflicts`.
    #[serde(default = "default_conflict_journal")]
    pub journal: bool,
    /// Let the daemon enable `changeStreamPreAndPostImages` on source collections.
    #[serde(default = "default_enable_pre_images")]
    pub enable_pre_images: bool,
    /// Per-namespace overrides; the first matching rule wins.
    #[serde(default)]
    pub rules: Vec<ConflictRule>,
}

/// `[validation]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Seconds between passes; 0 = off.
    #[serde(default = "default_validation_interval_seconds")]
    pub interval_seconds: u64,
    /// `hash` or `count`.
    #[serde(default = "default_validation_mode")]
    pub mode: ValidationMode,
    /// Repair drift through the worker.
    #[serde(default = "default_validation_repair")]
    pub repair: bool,
    /// Scan throttle; 0 = unthrottled.
    #[serde(default = "default_validation_max_docs_per_second")]
    pub max_docs_per_second: u64,
    /// Report field-order-only differences as drift.
    #[serde(default = "default_validation_strict_order")]
    pub strict_order: bool,
}

/// `[supervisor]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Consecutive failures before a worker is parked.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Backoff cap.
    #[serde(default = "default_max_backoff_seconds")]
    pub max_backoff_seconds: u64,
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address for metrics, health and the API.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Bearer token for mutating endpoints; unset (with `token_file`) = they answer 403.
    #[serde(default)]
    pub token: Option<Secret<String>>,
    /// File holding the token (trimmed).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` by the loader.
    #[serde(skip)]
    pub(crate) token_from_file: Option<Secret<String>>,
}

/// `[health]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `/readyz` fails above this lag.
    #[serde(default = "default_max_lag_seconds")]
    pub max_lag_seconds: u64,
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Namespaces with their own series; the rest aggregate under `_other`.
    #[serde(default = "default_metrics_max_namespaces")]
    pub max_namespaces: usize,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive (`info`, `mongo_syncd=debug,info`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level", deserialize_with = "lenient_string")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
}

/// `[shutdown]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Drain deadline after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_timeout_seconds")]
    pub timeout_seconds: u64,
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run the daemon's tasks; 0 = `TOKIO_WORKER_THREADS` when set, else one per
    /// CPU the process may use. Fewer leave CPU to what shares the host (a database, its
    /// agents): the daemon mostly waits on its two clusters. Read at start only.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

/// Most `runtime.worker_threads` (more threads than this is a typo, not a tuning).
pub const MAX_WORKER_THREADS: usize = 1024;

/// `[ha]`: leases in the destination decide which instance writes (DESIGN §2.12).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Take a lease before writing; without it the instance is a standby. Off by default: a
    /// single instance restarted after a crash would otherwise wait out its own old lease.
    #[serde(default)]
    pub enabled: bool,
    /// How long a lease lasts without renewal (renewed every third of it).
    #[serde(default = "default_ha_lease_seconds")]
    pub lease_seconds: u64,
    /// How a deposed instance is kept from writing.
    #[serde(default)]
    pub fencing: FencingMode,
    /// Namespaces split by a stable hash into this many leases; live instances share them.
    #[serde(default = "default_ha_partitions")]
    pub partitions: u32,
    /// Namespaces placed in a chosen partition instead of by hash (the first match wins).
    #[serde(default)]
    pub partition_overrides: Vec<PartitionOverride>,
    /// The one partition a term of this process syncs (set by the daemon, never by the file):
    /// restricts the namespace filter and names the term's shared streams.
    #[serde(skip)]
    pub term_partition: Option<u32>,
}

/// `[[ha.partition_overrides]]`: namespaces matching `namespaces` belong to `partition`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionOverride {
    pub namespaces: NamespacePattern,
    pub partition: u32,
}

/// Largest `ha.partitions`: each is a lease renewed every third of `ha.lease_seconds`.
pub const MAX_HA_PARTITIONS: u32 = 256;

/// `ha.fencing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FencingMode {
    /// Every write carries `maxTimeMS` below the lease margin; an active that cannot renew
    /// stops writing before its lease can expire, and a new owner waits out that bound.
    #[default]
    Lease,
    /// Each streaming batch of plain data events and its checkpoint in one destination
    /// transaction whose checkpoint write holds only under the lease epoch; everything else
    /// (copies, DDL, conflict policies, replays) stays lease-fenced, as does the process.
    Transaction,
}

// serde needs functions for defaults; each returns the documented constant.
fn default_sync_id() -> String {
    DEFAULT_SYNC_ID.to_owned()
}
fn default_namespaces() -> Vec<NamespacePattern> {
    DEFAULT_NAMESPACES
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect()
}
fn default_on_history_lost() -> OnHistoryLost {
    DEFAULT_ON_HISTORY_LOST
}
fn default_on_destination_reset() -> OnDestinationReset {
    DEFAULT_ON_DESTINATION_RESET
}
fn default_max_delete_fraction() -> f64 {
    DEFAULT_MAX_DELETE_FRACTION
}
fn default_initial_copy() -> InitialCopy {
    DEFAULT_INITIAL_COPY
}
fn default_on_collation_mismatch() -> OnCollationMismatch {
    OnCollationMismatch::Park
}
fn default_batch_max_events() -> u32 {
    DEFAULT_BATCH_MAX_EVENTS
}
fn default_max_buffered_bytes() -> u64 {
    DEFAULT_MAX_BUFFERED_BYTES
}

fn default_copy_concurrent_collections() -> u32 {
    DEFAULT_COPY_CONCURRENT_COLLECTIONS
}
fn default_copy_parallel_ranges() -> u32 {
    DEFAULT_COPY_PARALLEL_RANGES
}

fn default_batch_max_bytes() -> u64 {
    DEFAULT_BATCH_MAX_BYTES
}
fn default_batch_max_wait_ms() -> u64 {
    DEFAULT_BATCH_MAX_WAIT_MS
}
fn default_update_mode() -> UpdateMode {
    DEFAULT_UPDATE_MODE
}
fn default_checkpoint_database() -> String {
    DEFAULT_CHECKPOINT_DATABASE.to_owned()
}
fn default_checkpoint_interval_seconds() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL_SECONDS
}
fn default_conflict_policy() -> ConflictPolicy {
    DEFAULT_CONFLICT_POLICY
}
fn default_conflict_field() -> String {
    DEFAULT_CONFLICT_FIELD.to_owned()
}
fn default_conflict_journal() -> bool {
    DEFAULT_CONFLICT_JOURNAL
}
fn default_enable_pre_images() -> bool {
    DEFAULT_ENABLE_PRE_IMAGES
}
fn default_validation_interval_seconds() -> u64 {
    DEFAULT_VALIDATION_INTERVAL_SECONDS
}
fn default_validation_mode() -> ValidationMode {
    DEFAULT_VALIDATION_MODE
}
fn default_validation_repair() -> bool {
    DEFAULT_VALIDATION_REPAIR
}
fn default_validation_max_docs_per_second() -> u64 {
    DEFAULT_VALIDATION_MAX_DOCS_PER_SECOND
}
fn default_validation_strict_order() -> bool {
    DEFAULT_VALIDATION_STRICT_ORDER
}
fn default_max_restarts() -> u32 {
    DEFAULT_MAX_RESTARTS
}
fn default_max_backoff_seconds() -> u64 {
    DEFAULT_MAX_BACKOFF_SECONDS
}
fn default_http_listen() -> SocketAddr {
    DEFAULT_HTTP_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9290)))
}
fn default_max_lag_seconds() -> u64 {
    DEFAULT_MAX_LAG_SECONDS
}
fn default_metrics_max_namespaces() -> usize {
    DEFAULT_METRICS_MAX_NAMESPACES
}
fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.to_owned()
}
fn default_log_format() -> LogFormat {
    DEFAULT_LOG_FORMAT
}
fn default_worker_threads() -> usize {
    DEFAULT_WORKER_THREADS
}
fn default_shutdown_timeout_seconds() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
}
fn default_ha_lease_seconds() -> u64 {
    DEFAULT_HA_LEASE_SECONDS
}
fn default_ha_partitions() -> u32 {
    1
}

macro_rules! impl_default_from_serde {
    ($($ty:ty),* $(,)?) => {$(
        impl Default for $ty {
            /// Every key at its `DEFAULT_*` value.
            fn default() -> Self {
                // An empty table deserialises to the serde defaults, which are the constants.
                serde::de::Deserialize::deserialize(
                    serde::de::value::MapDeserializer::<
                        std::iter::Empty<(String, String)>,
                        serde::de::value::Error,
                    >::new(std::iter::empty()),
                )
                .unwrap_or_else(|e| unreachable!("defaults of {} must deserialize: {e}", stringify!($ty)))
            }
        }
    )*};
}

impl_default_from_serde!(
    SyncConfig,
    ApplyConfig,
    CopyConfig,
    CheckpointConfig,
    ConflictConfig,
    ValidationConfig,
    SupervisorConfig,
    HttpConfig,
    HealthConfig,
    MetricsConfig,
    LogConfig,
    ShutdownConfig,
    RuntimeConfig,
    HaConfig,
);

// ---------------------------------------------------------------------------------------------
// Accessors used by the rest of the daemon
// ---------------------------------------------------------------------------------------------

impl EndpointConfig {
    /// `stream_scope` or its default.
    pub fn stream_scope(&self) -> StreamScope {
        self.stream_scope.unwrap_or_default()
    }

    /// `maxPoolSize` as the client gets it: the key, else the URI's, else the default.
    pub fn effective_max_pool_size(&self) -> u32 {
        self.max_pool_size
            .or_else(|| {
                self.uri()
                    .and_then(|u| ConnectionString::parse(u.expose()).ok())
                    .and_then(|c| c.max_pool_size)
            })
            .unwrap_or(DEFAULT_MAX_POOL_SIZE)
    }

    /// `collection_streams_max` or its default.
    pub fn collection_streams_max(&self) -> usize {
        self.collection_streams_max
            .unwrap_or(DEFAULT_COLLECTION_STREAMS_MAX)
    }

    /// The connection string, from `uri` or the contents of `uri_file`.
    pub fn uri(&self) -> Option<&Secret<String>> {
        self.uri.as_ref().or(self.uri_from_file.as_ref())
    }

    /// The connection string with its password replaced by `***`, for logs and status.
    pub fn redacted_uri(&self) -> Option<String> {
        self.uri().map(|u| redact_uri(u.expose()))
    }

    /// Effective `appName`: this key, else the URI's, else [`DEFAULT_APP_NAME`].
    fn app_name_or(&self, from_uri: Option<String>) -> String {
        self.app_name
            .clone()
            .or(from_uri)
            .unwrap_or_else(|| DEFAULT_APP_NAME.to_owned())
    }

    /// The per-operation timeout callers apply to non-awaiting operations (`socket_timeout_ms`).
    pub fn socket_timeout(&self) -> Option<Duration> {
        self.socket_timeout_ms.map(Duration::from_millis)
    }

    /// Whether any `tls_*` key asks for TLS.
    fn wants_tls(&self) -> bool {
        self.tls_ca_file.is_some()
            || self.tls_certificate_key_file.is_some()
            || self.tls_allow_invalid_certificates
    }

    /// Driver options: the URI parsed by the driver (SRV records resolved, hence `async`), with
    /// this section's keys applied over it and the daemon's write concern (`w: majority,
    /// j: true`) set. Errors name the key relative to the section (`uri`, ...); use
    /// [`Config::source_client_options`] / [`Config::destination_client_options`] for full paths.
    pub async fn client_options(&self) -> Result<ClientOptions, ConfigError> {
        let uri = self
            .uri()
            .ok_or_else(|| ConfigError::invalid("uri", "required (set uri or uri_file)"))?;
        let conn =
            parse_connection_string(uri.expose()).map_err(|e| ConfigError::invalid("uri", e))?;
        let mut opts = ClientOptions::parse(conn)
            .await
            .map_err(|e| ConfigError::invalid("uri", redact_text(&e.to_string())))?;
        self.apply_to(&mut opts)?;
        Ok(opts)
    }

    /// Applies this section's keys to driver options parsed from the URI.
    fn apply_to(&self, opts: &mut ClientOptions) -> Result<(), ConfigError> {
        opts.app_name = Some(self.app_name_or(opts.app_name.take()));
        opts.max_pool_size = Some(
            self.max_pool_size
                .or(opts.max_pool_size)
                .unwrap_or(DEFAULT_MAX_POOL_SIZE),
        );
        opts.min_pool_size = Some(
            self.min_pool_size
                .or(opts.min_pool_size)
                .unwrap_or(DEFAULT_MIN_POOL_SIZE),
        );
        // 0 means "no limit" in the connection-string spec; this driver would instead close
        // every connection as soon as it is checked in, so 0 (key or URI) becomes None.
        let idle_ms = self
            .max_idle_time_ms
            .or(opts.max_idle_time.map(|d| d.as_millis() as u64))
            .unwrap_or(DEFAULT_MAX_IDLE_TIME_MS);
        opts.max_idle_time = (idle_ms > 0).then(|| Duration::from_millis(idle_ms));
        opts.connect_timeout = Some(
            self.connect_timeout_ms
                .map(Duration::from_millis)
                .or(opts.connect_timeout)
                .unwrap_or(Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS)),
        );
        opts.server_selection_timeout = Some(
            self.server_selection_timeout_ms
                .map(Duration::from_millis)
                .or(opts.server_selection_timeout)
                .unwrap_or(Duration::from_millis(DEFAULT_SERVER_SELECTION_TIMEOUT_MS)),
        );
        if self.wants_tls() {
            let mut tls = match opts.tls.take() {
                Some(Tls::Enabled(tls)) => tls,
                Some(Tls::Disabled) => {
                    return Err(ConfigError::invalid(
                        "uri",
                        "the URI disables TLS (tls=false) but tls_* keys are set",
                    ))
                }
                None => TlsOptions::default(),
            };
            if let Some(ca) = &self.tls_ca_file {
                tls.ca_file_path = Some(ca.clone());
            }
            if let Some(cert) = &self.tls_certificate_key_file {
                tls.cert_key_file_path = Some(cert.clone());
            }
            if self.tls_allow_invalid_certificates {
                tls.allow_invalid_certificates = Some(true);
            }
            opts.tls = Some(Tls::Enabled(tls));
        }
        opts.write_concern = Some(daemon_write_concern());
        Ok(())
    }
}

/// The write concern of every daemon write: majority, journaled (DESIGN §2.5).
pub fn daemon_write_concern() -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .build()
}

/// Parses a connection string, keeping credentials out of the error message.
fn parse_connection_string(uri: &str) -> Result<ConnectionString, String> {
    if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
        return Err("must start with mongodb:// or mongodb+srv://".to_owned());
    }
    ConnectionString::parse(uri).map_err(|e| {
        let text = match e.kind.as_ref() {
            mongodb::error::ErrorKind::InvalidArgument { message, .. } => message.clone(),
            _ => e.to_string(),
        };
        let text = redact_text(&text);
        if quotes_credentials(uri, &text) {
            // A raw reserved character (`?`, `#`, `/`, `@`, ...) in the password makes the
            // parser cut the URI inside the credentials and quote a piece of them.
            return "not a valid connection string (the parser's message is withheld because it \
                    quotes part of the credentials): percent-encode reserved characters such \
                    as : / ? # [ ] @ % in the user name and password (e.g. ? as %3F)"
                .to_owned();
        }
        format!("not a valid connection string: {text}")
    })
}

/// Whether `message` contains any two consecutive characters of the user-info part of `uri`
/// (everything between `://` and the last `@`, wherever a raw reserved character put it).
fn quotes_credentials(uri: &str, message: &str) -> bool {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let Some(at) = rest.rfind('@') else {
        return false;
    };
    let userinfo: Vec<char> = rest[..at].chars().collect();
    userinfo.windows(2).any(|pair| {
        let needle: String = pair.iter().collect();
        message.contains(&needle)
    })
}

impl HttpConfig {
    /// The API token, from `token` or the contents of `token_file`; `None` = mutating endpoints
    /// answer 403.
    pub fn token(&self) -> Option<&Secret<String>> {
        self.token.as_ref().or(self.token_from_file.as_ref())
    }
}

impl ApplyConfig {
    /// `batch_max_wait_ms` as a duration.
    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
}

impl Config {
    /// A config with every default and the two connection strings; validated.
    pub fn from_uris(source: &str, destination: &str) -> Result<Config, ConfigError> {
        let mut config = Config {
            source: EndpointConfig::default(),
            destination: EndpointConfig::default(),
            sync: SyncConfig::default(),
            apply: ApplyConfig::default(),
            copy: CopyConfig::default(),
            checkpoint: CheckpointConfig::default(),
            conflict: ConflictConfig::default(),
            validation: ValidationConfig::default(),
            supervisor: SupervisorConfig::default(),
            http: HttpConfig::default(),
            health: HealthConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            shutdown: ShutdownConfig::default(),
            runtime: RuntimeConfig::default(),
            ha: HaConfig::default(),
            warnings: Vec::new(),
        };
        config.source.uri = Some(Secret::new(source.to_owned()));
        config.destination.uri = Some(Secret::new(destination.to_owned()));
        config.validate()?;
        Ok(config)
    }

    /// Which source namespaces are synced (by this term, under `ha.partitions`).
    pub fn namespace_filter(&self) -> NamespaceFilter {
        let filter = NamespaceFilter::new(
            self.sync.namespaces.clone(),
            self.sync.exclude.clone(),
            self.checkpoint.database.clone(),
        );
        match self.ha.term_partition {
            Some(partition) => filter.within_partition(self.partitioner(), partition),
            None => filter,
        }
    }

    /// The namespace → partition function of `[ha]`.
    pub fn partitioner(&self) -> partition::Partitioner {
        partition::Partitioner::from_config(&self.ha)
    }

    /// Source → destination names.
    pub fn rename_map(&self) -> &RenameMap {
        &self.sync.rename
    }

    /// The conflict policy for source namespace `db.coll` and, for `newest-wins` /
    /// `version-wins`, the field it compares. The first matching `conflict.rules` entry wins;
    /// a rule without `field` uses `conflict.field`.
    pub fn conflict_for(&self, db: &str, coll: &str) -> (ConflictPolicy, Option<String>) {
        let (policy, field) = self
            .conflict
            .rules
            .iter()
            .find(|rule| rule.namespaces.iter().any(|p| p.matches(db, coll)))
            .map(|rule| (rule.policy, rule.field.as_deref()))
            .unwrap_or((self.conflict.policy, None));
        if !policy.needs_field() {
            return (policy, None);
        }
        let field = field
            .filter(|f| !f.is_empty())
            .unwrap_or(self.conflict.field.as_str());
        (policy, Some(field.to_owned()).filter(|f| !f.is_empty()))
    }

    /// Source driver options; errors name `source.*`.
    pub async fn source_client_options(&self) -> Result<ClientOptions, ConfigError> {
        self.source
            .client_options()
            .await
            .map_err(|e| e.prefixed("source"))
    }

    /// Destination driver options; errors name `destination.*`.
    pub async fn destination_client_options(&self) -> Result<ClientOptions, ConfigError> {
        self.destination
            .client_options()
            .await
            .map_err(|e| e.prefixed("destination"))
    }

    /// A `Serialize` view with credentials redacted, for `check-config` and status.
    pub fn redacted(&self) -> RedactedConfig<'_> {
        RedactedConfig {
            source: RedactedEndpoint {
                // The effective stream plan, defaults included.
                stream_scope: Some(self.source.stream_scope()),
                collection_streams_max: Some(self.source.collection_streams_max()),
                ..RedactedEndpoint::new(&self.source)
            },
            destination: RedactedEndpoint::new(&self.destination),
            sync: &self.sync,
            apply: &self.apply,
            copy: &self.copy,
            checkpoint: &self.checkpoint,
            conflict: &self.conflict,
            validation: &self.validation,
            supervisor: &self.supervisor,
            http: RedactedHttp {
                listen: self.http.listen,
                token: self.http.token().map(|_| secret::REDACTED),
                token_file: self.http.token_file.as_ref(),
            },
            health: &self.health,
            metrics: &self.metrics,
            log: &self.log,
            shutdown: &self.shutdown,
            runtime: &self.runtime,
            ha: &self.ha,
        }
    }

    /// Checks everything that can be checked without I/O. Every problem is reported, each
    /// with the key path it concerns (`conflict.rules[1].field: ...`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err =
            |field: String, constraint: String| errors.push(FieldError { field, constraint });

        let source = validate_endpoint("source", &self.source, &mut err);
        let destination = validate_endpoint("destination", &self.destination, &mut err);
        if let (Some(source), Some(destination)) = (source, destination) {
            let shared: Vec<String> = host_keys(&source)
                .into_iter()
                .filter(|h| host_keys(&destination).contains(h))
                .collect();
            if !shared.is_empty() {
                err(
                    "destination.uri".into(),
                    format!(
                        "names the same host(s) as source.uri ({}); the destination must be a different deployment",
                        shared.join(", ")
                    ),
                );
            }
        }

        // [sync]
        let id = &self.sync.id;
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            err(
                "sync.id".into(),
                "must be 1-64 characters of [A-Za-z0-9._-]".into(),
            );
        }
        let fraction = self.sync.max_delete_fraction;
        if !(fraction > 0.0 && fraction <= 1.0) {
            err(
                "sync.max_delete_fraction".into(),
                "must be greater than 0 and at most 1 (1 turns the mass-delete guard off)".into(),
            );
        }
        if self.sync.namespaces.is_empty() {
            err(
                "sync.namespaces".into(),
                "must list at least one pattern (\"*.*\" syncs everything)".into(),
            );
        }
        for (key, list) in [
            ("sync.namespaces", &self.sync.namespaces),
            ("sync.exclude", &self.sync.exclude),
        ] {
            for (i, pattern) in list.iter().enumerate() {
                check_pattern_scope(
                    &format!("{key}[{i}]"),
                    pattern,
                    &self.checkpoint.database,
                    &mut err,
                );
            }
        }
        self.validate_rename(&mut err);
        if self.sync.start_at_operation_time.is_some()
            && self.sync.initial_copy != InitialCopy::Skip
        {
            err(
                "sync.start_at_operation_time".into(),
                "only allowed with initial_copy = \"skip\" (a copy always starts at the stream's first token)".into(),
            );
        }

        // [apply]
        let a = &self.apply;
        if a.batch_max_events == 0 || a.batch_max_events > MAX_BATCH_MAX_EVENTS {
            err(
                "apply.batch_max_events".into(),
                format!(
                    "must be between 1 and {MAX_BATCH_MAX_EVENTS} (the server's maxWriteBatchSize)"
                ),
            );
        }
        if !(MIN_BATCH_MAX_BYTES..=MAX_BATCH_MAX_BYTES).contains(&a.batch_max_bytes) {
            err(
                "apply.batch_max_bytes".into(),
                format!("must be between {MIN_BATCH_MAX_BYTES} (1 MiB) and {MAX_BATCH_MAX_BYTES} (the server's maxMessageSizeBytes)"),
            );
        }
        if a.max_buffered_bytes < a.batch_max_bytes || a.max_buffered_bytes > MAX_MAX_BUFFERED_BYTES
        {
            err(
                "apply.max_buffered_bytes".into(),
                format!("must be between apply.batch_max_bytes ({}) and {MAX_MAX_BUFFERED_BYTES} (64 GiB): one batch must fit the budget", a.batch_max_bytes),
            );
        }
        if a.batch_max_wait_ms > MAX_BATCH_MAX_WAIT_MS {
            err(
                "apply.batch_max_wait_ms".into(),
                format!("must be at most {MAX_BATCH_MAX_WAIT_MS}"),
            );
        }
        if let WriteLanes::Fixed(n) = a.write_lanes {
            if !(1..=MAX_WRITE_LANES).contains(&n) {
                err(
                    "apply.write_lanes".into(),
                    format!("must be \"auto\" or between 1 and {MAX_WRITE_LANES}"),
                );
            }
        }

        if a.transactions == TransactionMode::Atomic
            && self.source.stream_scope() == StreamScope::Collection
        {
            err(
                "apply.transactions".into(),
                "\"atomic\" needs a shared change stream, which sees every collection of a transaction: set source.stream_scope to \"auto\", \"database\" or \"deployment\"".into(),
            );
        }

        // [copy]
        if !(1..=MAX_COPY_CONCURRENT_COLLECTIONS).contains(&self.copy.concurrent_collections) {
            err(
                "copy.concurrent_collections".into(),
                format!("must be between 1 and {MAX_COPY_CONCURRENT_COLLECTIONS}"),
            );
        }
        if !(1..=MAX_COPY_PARALLEL_RANGES).contains(&self.copy.parallel_ranges) {
            err(
                "copy.parallel_ranges".into(),
                format!("must be between 1 and {MAX_COPY_PARALLEL_RANGES}"),
            );
        }

        // Stream plan keys belong to [source].
        if self.destination.stream_scope.is_some() {
            err(
                "destination.stream_scope".into(),
                "is a [source] key (the destination is never read with change streams)".into(),
            );
        }
        if self.destination.collection_streams_max.is_some() {
            err(
                "destination.collection_streams_max".into(),
                "is a [source] key".into(),
            );
        }
        if self
            .source
            .collection_streams_max
            .is_some_and(|n| n > MAX_COLLECTION_STREAMS_MAX)
        {
            err(
                "source.collection_streams_max".into(),
                format!("must be at most {MAX_COLLECTION_STREAMS_MAX}"),
            );
        }

        // [checkpoint]
        let db = &self.checkpoint.database;
        if let Err(e) = check_db_name(db) {
            err("checkpoint.database".into(), e);
        } else if SYSTEM_DATABASES.contains(&db.as_str()) {
            err(
                "checkpoint.database".into(),
                format!("{db:?} is a system database; choose another name"),
            );
        }
        if self.checkpoint.interval_seconds == 0 {
            err(
                "checkpoint.interval_seconds".into(),
                "must be greater than 0".into(),
            );
        }

        // [conflict]
        let c = &self.conflict;
        if !c.field.is_empty() {
            if let Err(e) = check_field_path(&c.field) {
                err("conflict.field".into(), e);
            }
        }
        if c.policy.needs_field() && c.field.is_empty() {
            err(
                "conflict.field".into(),
                format!("required for policy {:?}", c.policy.as_str()),
            );
        }
        for (i, rule) in c.rules.iter().enumerate() {
            let key = format!("conflict.rules[{i}]");
            if rule.namespaces.is_empty() {
                err(
                    format!("{key}.namespaces"),
                    "must list at least one pattern".into(),
                );
            }
            let field = rule.field.as_deref().filter(|f| !f.is_empty());
            if let Some(f) = field {
                if let Err(e) = check_field_path(f) {
                    err(format!("{key}.field"), e);
                }
            }
            if rule.policy.needs_field() && field.is_none() && c.field.is_empty() {
                err(
                    format!("{key}.field"),
                    format!(
                        "required for policy {:?} (or set conflict.field)",
                        rule.policy.as_str()
                    ),
                );
            }
        }

        // [validation]
        if self.validation.repair && self.validation.mode == ValidationMode::Count {
            err(
                "validation.repair".into(),
                "requires mode = \"hash\": counts cannot tell which documents differ".into(),
            );
        }

        // [supervisor]
        if self.supervisor.max_backoff_seconds == 0 {
            err(
                "supervisor.max_backoff_seconds".into(),
                "must be greater than 0".into(),
            );
        }

        // [http]
        if self.http.token.is_some() && self.http.token_file.is_some() {
            err(
                "http.token_file".into(),
                "set either token or token_file, not both".into(),
            );
        }
        if let Some(token) = self.http.token() {
            if token.expose().trim().is_empty() {
                err(
                    "http.token".into(),
                    "must not be empty (leave it unset to disable mutating endpoints)".into(),
                );
            }
        } else if self.http.token_file.is_some() {
            err(
                "http.token_file".into(),
                "was not read (load the config with config::load)".into(),
            );
        }

        // [health], [metrics], [log], [shutdown], [runtime]
        if self.health.max_lag_seconds == 0 {
            err(
                "health.max_lag_seconds".into(),
                "must be greater than 0".into(),
            );
        }
        if self.metrics.max_namespaces == 0 {
            err(
                "metrics.max_namespaces".into(),
                "must be greater than 0".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            err(
                "log.level".into(),
                format!("not a valid filter directive: {e}"),
            );
        }
        if self.shutdown.timeout_seconds == 0 {
            err(
                "shutdown.timeout_seconds".into(),
                "must be greater than 0".into(),
            );
        }
        if self.runtime.worker_threads > MAX_WORKER_THREADS {
            err(
                "runtime.worker_threads".into(),
                format!("must be at most {MAX_WORKER_THREADS} (0 = one per CPU)"),
            );
        }
        self.validate_ha(&mut err);

        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { errors })
        }
    }

    /// `[ha]`: the lease arithmetic of DESIGN §2.12 must leave room for a renewal.
    fn validate_ha(&self, err: &mut impl FnMut(String, String)) {
        let ha = &self.ha;
        if !(MIN_HA_LEASE_SECONDS..=3600).contains(&ha.lease_seconds) {
            err(
                "ha.lease_seconds".into(),
                format!("must be between {MIN_HA_LEASE_SECONDS} and 3600"),
            );
        }
        if !(1..=MAX_HA_PARTITIONS).contains(&ha.partitions) {
            err(
                "ha.partitions".into(),
                format!("must be between 1 and {MAX_HA_PARTITIONS}"),
            );
        }
        if ha.partitions > 1 && !ha.enabled {
            err(
                "ha.partitions".into(),
                "needs ha.enabled = true (each partition is a lease)".into(),
            );
        }
        for (i, o) in ha.partition_overrides.iter().enumerate() {
            if o.partition >= ha.partitions {
                err(
                    format!("ha.partition_overrides[{i}].partition"),
                    format!(
                        "must be below ha.partitions ({}): partitions are numbered from 0",
                        ha.partitions
                    ),
                );
            }
        }
        if !ha.enabled {
            return;
        }
        // A deposed active's last write must be dead before a new owner writes: every write
        // is bounded by the destination's socket timeout, which must fit in a third of the lease.
        let third_ms = ha.lease_seconds * 1000 / 3;
        match self.destination.socket_timeout_ms {
            None => err(
                "destination.socket_timeout_ms".into(),
                format!(
                    "must be set when ha.enabled (at most a third of ha.lease_seconds, e.g. \
                     {third_ms}): it bounds every write, which is how a deposed instance is fenced"
                ),
            ),
            Some(ms) if ms > third_ms => err(
                "destination.socket_timeout_ms".into(),
                format!("must be at most a third of ha.lease_seconds ({third_ms}) when ha.enabled"),
            ),
            Some(_) => {}
        }
    }

    fn validate_rename(&self, err: &mut impl FnMut(String, String)) {
        for (key, why) in self.sync.rename.static_collisions(&self.namespace_filter()) {
            err(format!("sync.rename.{key:?}"), why);
        }
        let metadata = self.checkpoint.database.as_str();
        let mut db_targets: BTreeMap<&str, &str> = BTreeMap::new();
        for (from, to) in self.sync.rename.database_entries() {
            let key = format!("sync.rename.{from:?}");
            if is_reserved_db(from, metadata) {
                err(
                    key.clone(),
                    format!("{from:?} is a system or metadata database and is never synced"),
                );
            }
            if is_reserved_db(to, metadata) {
                err(key.clone(), format!("target {to:?} is a system database or the metadata database (checkpoint.database)"));
            }
            if let Some(other) = db_targets.insert(to.as_str(), from.as_str()) {
                err(
                    key,
                    format!("target {to:?} is also the target of {other:?}"),
                );
            }
        }
        let mut coll_targets: BTreeMap<(&str, &str), String> = BTreeMap::new();
        for ((fdb, fcoll), (tdb, tcoll)) in self.sync.rename.collection_entries() {
            let key = format!("sync.rename.\"{fdb}.{fcoll}\"");
            if is_reserved_db(fdb, metadata) || fcoll.starts_with(SYSTEM_COLLECTION_PREFIX) {
                err(
                    key.clone(),
                    "a system or metadata namespace is never synced".into(),
                );
            }
            if is_reserved_db(tdb, metadata) {
                err(key.clone(), format!("target database {tdb:?} is a system database or the metadata database (checkpoint.database)"));
            }
            if tcoll.starts_with(SYSTEM_COLLECTION_PREFIX) {
                err(
                    key.clone(),
                    format!("target {tdb}.{tcoll} is a system collection"),
                );
            }
            if let Some(other) =
                coll_targets.insert((tdb.as_str(), tcoll.as_str()), format!("{fdb}.{fcoll}"))
            {
                err(
                    key,
                    format!("target \"{tdb}.{tcoll}\" is also the target of {other:?}"),
                );
            }
        }
    }
}

/// Checks one endpoint; returns the parsed URI when it is usable for cross-checks.
fn validate_endpoint(
    section: &str,
    endpoint: &EndpointConfig,
    err: &mut impl FnMut(String, String),
) -> Option<ConnectionString> {
    let uri_key = format!("{section}.uri");
    if endpoint.uri.is_some() && endpoint.uri_file.is_some() {
        err(
            format!("{section}.uri_file"),
            "set either uri or uri_file, not both".into(),
        );
        return None;
    }
    let uri = match endpoint.uri() {
        Some(uri) => uri,
        None if endpoint.uri_file.is_some() => {
            err(
                format!("{section}.uri_file"),
                "was not read (load the config with config::load)".into(),
            );
            return None;
        }
        None => {
            err(
                uri_key,
                "required (set uri, uri_file, or MONGO_SYNCD_<SECTION>__URI)".into(),
            );
            return None;
        }
    };
    let key = if endpoint.uri_file.is_some() {
        format!("{section}.uri_file")
    } else {
        uri_key
    };
    let conn = match parse_connection_string(uri.expose()) {
        Ok(conn) => conn,
        Err(e) => {
            err(key, e);
            return None;
        }
    };
    if let Some(wc) = &conn.write_concern {
        match &wc.w {
            None | Some(Acknowledgment::Majority) => {}
            Some(w) => err(
                key.clone(),
                format!(
                    "write concern w={} is not majority; mongo-syncd always writes with w: \"majority\", j: true — remove w from the URI",
                    match w {
                        Acknowledgment::Nodes(n) => n.to_string(),
                        Acknowledgment::Custom(tag) => tag.clone(),
                        other => format!("{other:?}"),
                    }
                ),
            ),
        }
        if wc.journal == Some(false) {
            err(
                key.clone(),
                "journal=false weakens the write concern; mongo-syncd always writes with w: \"majority\", j: true — remove it from the URI".into(),
            );
        }
    }
    if endpoint.wants_tls() && matches!(conn.tls, Some(Tls::Disabled)) {
        err(
            key.clone(),
            "the URI disables TLS (tls=false) but tls_* keys are set".into(),
        );
    }
    let pool_max = endpoint
        .max_pool_size
        .or(conn.max_pool_size)
        .unwrap_or(DEFAULT_MAX_POOL_SIZE);
    let pool_min = endpoint
        .min_pool_size
        .or(conn.min_pool_size)
        .unwrap_or(DEFAULT_MIN_POOL_SIZE);
    if pool_max == 0 {
        err(
            format!("{section}.max_pool_size"),
            "must be greater than 0 (0 would mean unlimited connections)".into(),
        );
    } else if pool_min > pool_max {
        err(
            format!("{section}.min_pool_size"),
            format!("must not exceed max_pool_size ({pool_max})"),
        );
    }
    for (name, value) in [
        ("connect_timeout_ms", endpoint.connect_timeout_ms),
        (
            "server_selection_timeout_ms",
            endpoint.server_selection_timeout_ms,
        ),
        ("socket_timeout_ms", endpoint.socket_timeout_ms),
    ] {
        if value == Some(0) {
            err(
                format!("{section}.{name}"),
                "must be greater than 0 (omit the key for the default)".into(),
            );
        }
    }
    if let Some(name) = &endpoint.app_name {
        if name.is_empty() {
            err(format!("{section}.app_name"), "must not be empty".into());
        }
    }
    Some(conn)
}

/// Normalised `host:port` (or SRV name) identities of a connection string.
fn host_keys(conn: &ConnectionString) -> Vec<String> {
    match &conn.host_info {
        HostInfo::HostIdentifiers(hosts) => hosts
            .iter()
            .map(|h| match h {
                ServerAddress::Tcp { host, port } => {
                    format!("{}:{}", host.to_ascii_lowercase(), port.unwrap_or(27017))
                }
                other => other.to_string(),
            })
            .collect(),
        HostInfo::DnsRecord(name) => vec![format!("srv:{}", name.to_ascii_lowercase())],
        #[allow(unreachable_patterns)]
        _ => Vec::new(),
    }
}

/// Flags patterns that can never match because they name never-synced namespaces.
fn check_pattern_scope(
    key: &str,
    pattern: &NamespacePattern,
    metadata_db: &str,
    err: &mut impl FnMut(String, String),
) {
    if let Some((db, coll)) = pattern.as_str().split_once('.') {
        if db != "*" && is_reserved_db(db, metadata_db) {
            err(
                key.to_owned(),
                format!("{db:?} is a system or metadata database and is never synced"),
            );
        } else if coll != "*" && coll.starts_with(SYSTEM_COLLECTION_PREFIX) {
            err(
                key.to_owned(),
                "system.* collections are never synced".to_owned(),
            );
        }
    }
}

/// A document field path for the version/date comparison.
fn check_field_path(field: &str) -> Result<(), String> {
    if field.starts_with('$') {
        return Err(format!(
            "{field:?} must be a field path, not an expression (no leading '$')"
        ));
    }
    if field.split('.').any(str::is_empty) {
        return Err(format!("{field:?} has an empty path segment"));
    }
    if field == "_id" {
        return Err("\"_id\" never changes and cannot order versions".to_owned());
    }
    Ok(())
}

/// `Serialize` twin of [`Config`] with credentials redacted.
#[derive(Debug, Serialize)]
pub struct RedactedConfig<'a> {
    /// `[source]`
    pub source: RedactedEndpoint,
    /// `[destination]`
    pub destination: RedactedEndpoint,
    /// `[sync]`
    pub sync: &'a SyncConfig,
    /// `[apply]`
    pub apply: &'a ApplyConfig,
    /// `[copy]`
    pub copy: &'a CopyConfig,
    /// `[checkpoint]`
    pub checkpoint: &'a CheckpointConfig,
    /// `[conflict]`
    pub conflict: &'a ConflictConfig,
    /// `[validation]`
    pub validation: &'a ValidationConfig,
    /// `[supervisor]`
    pub supervisor: &'a SupervisorConfig,
    /// `[http]`
    pub http: RedactedHttp<'a>,
    /// `[health]`
    pub health: &'a HealthConfig,
    /// `[metrics]`
    pub metrics: &'a MetricsConfig,
    /// `[log]`
    pub log: &'a LogConfig,
    /// `[shutdown]`
    pub shutdown: &'a ShutdownConfig,
    /// `[runtime]`
    pub runtime: &'a RuntimeConfig,
    /// `[ha]`
    pub ha: &'a HaConfig,
}

impl RedactedConfig<'_> {
    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// An endpoint with effective driver options and the URI's password replaced by `***`.
#[derive(Debug, Serialize)]
pub struct RedactedEndpoint {
    /// Redacted connection string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Where the connection string was read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri_file: Option<PathBuf>,
    /// `appName` (key or default; a URI `appName` still applies when the key is unset).
    pub app_name: String,
    /// Pool maximum (key or default; a URI `maxPoolSize` applies when the key is unset).
    pub max_pool_size: u32,
    /// Pool minimum.
    pub min_pool_size: u32,
    /// Idle connections are closed after this long (0: never).
    pub max_idle_time_ms: u64,
    /// Connect timeout.
    pub connect_timeout_ms: u64,
    /// Server selection timeout.
    pub server_selection_timeout_ms: u64,
    /// Per-operation timeout, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_timeout_ms: Option<u64>,
    /// CA file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_certificate_key_file: Option<PathBuf>,
    /// Certificate verification disabled.
    pub tls_allow_invalid_certificates: bool,
    /// `stream_scope` (`[source]` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_scope: Option<StreamScope>,
    /// `collection_streams_max` (`[source]` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collection_streams_max: Option<usize>,
}

impl RedactedEndpoint {
    fn new(e: &EndpointConfig) -> Self {
        // Show what the URI itself says where the key is unset, so the printout is effective.
        let conn = e
            .uri()
            .and_then(|u| ConnectionString::parse(u.expose()).ok());
        let conn = conn.as_ref();
        Self {
            uri: e.redacted_uri(),
            uri_file: e.uri_file.clone(),
            app_name: e.app_name_or(conn.and_then(|c| c.app_name.clone())),
            max_pool_size: e.effective_max_pool_size(),
            min_pool_size: e
                .min_pool_size
                .or(conn.and_then(|c| c.min_pool_size))
                .unwrap_or(DEFAULT_MIN_POOL_SIZE),
            max_idle_time_ms: e
                .max_idle_time_ms
                .or(conn
                    .and_then(|c| c.max_idle_time)
                    .map(|d| d.as_millis() as u64))
                .unwrap_or(DEFAULT_MAX_IDLE_TIME_MS),
            connect_timeout_ms: e
                .connect_timeout_ms
                .or(conn
                    .and_then(|c| c.connect_timeout)
                    .map(|d| d.as_millis() as u64))
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS),
            server_selection_timeout_ms: e
                .server_selection_timeout_ms
                .or(conn
                    .and_then(|c| c.server_selection_timeout)
                    .map(|d| d.as_millis() as u64))
                .unwrap_or(DEFAULT_SERVER_SELECTION_TIMEOUT_MS),
            socket_timeout_ms: e.socket_timeout_ms,
            tls_ca_file: e.tls_ca_file.clone(),
            tls_certificate_key_file: e.tls_certificate_key_file.clone(),
            tls_allow_invalid_certificates: e.tls_allow_invalid_certificates,
            stream_scope: e.stream_scope,
            collection_streams_max: e.collection_streams_max,
        }
    }
}

/// `[http]` with the token shown as `***` when set.
#[derive(Debug, Serialize)]
pub struct RedactedHttp<'a> {
    /// Listen address.
    pub listen: SocketAddr,
    /// `***` when a token is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<&'static str>,
    /// Where the token was read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<&'a PathBuf>,
}

#[cfg(test)]
mod tests;

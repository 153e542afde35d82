//! Wiring: clients, metadata, supervisor, HTTP, signals, systemd notifications. Maps the
//! outcome to an exit code (DESIGN §7).

mod partitions;
mod validate_command;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use mongodb::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    checkpoint::CheckpointStore,
    cli::{RunOptions, ValidateOptions},
    config::{self, Config},
    error::{policy, Backoff, ErrorKind, RetryDirective, SyncError},
    exit,
    guard::DeleteGuard,
    identity::{self, IdentityWatch},
    metadata::{IdentityCheck, Metadata},
    metrics::{Metrics, ReloadResult, Trigger},
    ops::http::{self, HttpState},
    ops::notify,
    ops::signal::{self, Signal},
    ops::telemetry::LogReloadHandle,
    source::Source,
    status::StatusRegistry,
    supervisor::{Control, Supervisor},
    worker::Pipeline,
};

/// How the daemon is embedded: by `run` (signals, config file) or by the demo.
pub struct DaemonOptions {
    /// Re-read on SIGHUP; `None` disables reloads.
    pub config_path: Option<PathBuf>,
    pub reset_identity: bool,
    pub log_reload: Option<LogReloadHandle>,
    /// Listen for Unix signals (the demo handles Ctrl-C itself).
    pub handle_signals: bool,
    /// Cancelled to stop the daemon gracefully.
    pub shutdown: CancellationToken,
    /// Receives the pipeline's shared state once the daemon is connected and running.
    pub on_ready: Option<tokio::sync::oneshot::Sender<RunningDaemon>>,
}

/// Handles to a running daemon (for the demo and tests).
#[derive(Clone)]
pub struct RunningDaemon {
    pub metrics: Metrics,
    pub status: Arc<StatusRegistry>,
    pub control: mpsc::Sender<Control>,
    pub http_addr: std::net::SocketAddr,
}

/// `mongo-syncd run`: the daemon.
pub async fn run(config: Config, options: RunOptions) -> ExitCode {
    let code = run_daemon(
        config,
        DaemonOptions {
            config_path: Some(options.config_path),
            reset_identity: options.reset_identity,
            log_reload: options.log_reload,
            handle_signals: true,
            shutdown: CancellationToken::new(),
            on_ready: None,
        },
    )
    .await;
    ExitCode::from(code)
}

/// `mongo-syncd validate`: one validation pass (`validate_command`).
pub async fn validate(config: Config, options: ValidateOptions) -> ExitCode {
    let clients = match build_clients(&config, None).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot configure the MongoDB clients");
            return ExitCode::from(match policy(&e) {
                RetryDirective::Fatal { exit_code } => exit_code,
                _ => exit::validate::COULD_NOT_RUN,
            });
        }
    };
    ExitCode::from(Box::pin(validate_command::run(config, options, clients)).await)
}

fn exit_code_for(err: &SyncError) -> u8 {
    match policy(err) {
        RetryDirective::Fatal { exit_code } => exit_code,
        _ => exit::RUNTIME_FAILURE,
    }
}

/// Waits until `probe` succeeds, retrying transient failures with backoff (a daemon does not
/// exit because the network blinked). Fatal failures (authentication, configuration) return.
async fn wait_for<T, F, Fut>(
    what: &str,
    hosts: &str,
    shutdown: &CancellationToken,
    probe: F,
) -> Result<Option<T>, SyncError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SyncError>>,
{
    retry_while(what, hosts, shutdown, probe, |d| {
        !matches!(d, RetryDirective::Fatal { .. })
    })
    .await
}

/// Runs a start-up step on the metadata, retrying only transient failures (a failover, a
/// dropped connection) with backoff; any other failure is returned for the caller to decide.
async fn retry_transient<T, F, Fut>(
    what: &str,
    hosts: &str,
    shutdown: &CancellationToken,
    step: F,
) -> Result<Option<T>, SyncError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SyncError>>,
{
    retry_while(what, hosts, shutdown, step, |d| {
        matches!(d, RetryDirective::Backoff)
    })
    .await
}

async fn retry_while<T, F, Fut>(
    what: &str,
    hosts: &str,
    shutdown: &CancellationToken,
    mut probe: F,
    retry: impl Fn(&RetryDirective) -> bool,
) -> Result<Option<T>, SyncError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SyncError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = probe() => r,
        };
        match result {
            Ok(v) => {
                if attempt > 0 {
                    tracing::info!(cluster = what, hosts = %hosts, "connected");
                }
                return Ok(Some(v));
            }
            Err(e) => match policy(&e) {
                directive if !retry(&directive) => return Err(e),
                _ => {
                    attempt += 1;
                    tracing::warn!(cluster = what, hosts = %hosts, attempt, error = %e, "waiting for the {what} cluster to become reachable");
                    if !backoff.sleep(shutdown).await {
                        return Ok(None);
                    }
                }
            },
        }
    }
}

/// Runs the daemon until shutdown; returns the exit code.
pub async fn run_daemon(config: Config, options: DaemonOptions) -> u8 {
    let shutdown = options.shutdown.clone();
    let metrics = Metrics::new(config.metrics.max_namespaces);
    let status = Arc::new(StatusRegistry::default());
    *status.source_hosts.write() = config.source.redacted_uri().unwrap_or_default();
    *status.destination_hosts.write() = config.destination.redacted_uri().unwrap_or_default();
    let (control_tx, control_rx) = mpsc::channel::<Control>(32);
    let heartbeat = Arc::new(std::sync::atomic::AtomicU64::new(0));

    if options.handle_signals {
        match signal::listen() {
            Ok(signals) => spawn_signal_forwarder(
                signals,
                shutdown.clone(),
                control_tx.clone(),
                options.config_path.clone(),
                options.log_reload.clone(),
                metrics.clone(),
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return exit::RUNTIME_FAILURE;
            }
        }
    }

    // HTTP first: /healthz and /metrics answer while the clusters are still being reached.
    let http_cancel = CancellationToken::new();
    let http_state = HttpState::new(
        metrics.clone(),
        Arc::clone(&status),
        control_tx.clone(),
        config.http.token().map(|t| t.expose().to_string()),
        Arc::clone(&heartbeat),
        config.health.max_lag_seconds as f64,
    );
    let max_connections =
        http::connection_cap(crate::ops::rlimit::nofile().map_or(1024, |limit| limit.soft));
    let http_addr = match http::serve(
        config.http.listen,
        http_state,
        http_cancel.clone(),
        max_connections,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(listen = %config.http.listen, error = %e, "cannot listen for http");
            return exit::RUNTIME_FAILURE;
        }
    };
    let _stop_http = http_cancel.drop_guard();

    // Every (re)connection of either client triggers an identity check (DESIGN §2.10).
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let (source_client, dest_client) =
        match build_clients(&config, Some((Arc::clone(&reconnected), &status, &metrics))).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot configure the MongoDB clients");
                return exit_code_for(&e);
            }
        };
    let lease_client = match build_lease_client(&config).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot configure the MongoDB clients");
            return exit_code_for(&e);
        }
    };
    // Every exit path below ends with the clients shut down explicitly: a client dropped
    // while the runtime stops would end its sessions from a task that may panic (driver).
    let closing = (
        source_client.clone(),
        dest_client.clone(),
        lease_client.clone(),
    );
    let code = 'run: {
        let source = Source::new(source_client, config.source.socket_timeout());
        let source_hosts = status.source_hosts.read().clone();
        let dest_hosts = status.destination_hosts.read().clone();
        let identity =
            match wait_for("source", &source_hosts, &shutdown, || source.identity()).await {
                Ok(Some(id)) => id,
                Ok(None) => break 'run exit::OK,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the source");
                    break 'run exit_code_for(&e);
                }
            };
        status.set_source_connected(true);
        metrics.set_source_connected(true);
        match source.detect_features().await {
            Ok(version) => {
                tracing::info!(version = %version, source = %identity.describe(), "source connected")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the source version; large events will not be split")
            }
        }
        let dest_ping = || async {
            dest_client
                .database("admin")
                .run_command(bson::doc! {"ping": 1})
                .await
                .map(|_| ())
                .map_err(|e| {
                    SyncError::mongo(
                        ErrorKind::DestinationConnection,
                        "pinging the destination",
                        e,
                    )
                })
        };
        match wait_for("destination", &dest_hosts, &shutdown, dest_ping).await {
            Ok(Some(())) => {}
            Ok(None) => break 'run exit::OK,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the destination");
                break 'run exit_code_for(&e);
            }
        }
        status.set_destination_connected(true);
        metrics.set_destination_connected(true);

        // Identities, not host strings: a destination that is the source under another name
        // is refused before anything is written (DESIGN §2.10).
        let observe_source = || identity::observe(source.client(), ErrorKind::SourceConnection);
        let observe_dest = || identity::observe(&dest_client, ErrorKind::DestinationConnection);
        let (source_seen, dest_seen) = match (
            wait_for("source", &source_hosts, &shutdown, observe_source).await,
            wait_for("destination", &dest_hosts, &shutdown, observe_dest).await,
        ) {
            (Ok(Some(s)), Ok(Some(d))) => (s, d),
            (Ok(None), _) | (_, Ok(None)) => break 'run exit::OK,
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot read the deployments' identities");
                break 'run exit_code_for(&e);
            }
        };
        if let Err(e) = identity::refuse_same_deployment(&source_seen, &dest_seen) {
            tracing::error!(error = %e, "refusing to start");
            break 'run exit_code_for(&e);
        }

        let connected = Arc::new(Connected {
            source,
            dest_client,
            lease_client,
            identity,
            dest_seen,
            metrics: metrics.clone(),
            status: Arc::clone(&status),
            heartbeat: Arc::clone(&heartbeat),
            reconnected,
            dest_hosts,
            control_tx: control_tx.clone(),
            http_addr,
            shared_watch: std::sync::OnceLock::new(),
            shared_budget: std::sync::OnceLock::new(),
            shared_copy_slots: std::sync::OnceLock::new(),
        });
        let watchdog_cancel = CancellationToken::new();
        let _stop_watchdog = watchdog_cancel.clone().drop_guard();
        notify::spawn_watchdog(
            Arc::clone(&heartbeat),
            Arc::clone(&status),
            watchdog_cancel.clone(),
        );
        crate::ops::telemetry::spawn_progress_log(Arc::clone(&status), watchdog_cancel.clone());
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            notify::stopping();
        });
        let mut control_rx = control_rx;
        let mut on_ready = options.on_ready;
        let Some(coordinator) = connected.coordinator(&config) else {
            let code = connected
                .run_term(
                    config,
                    options.reset_identity,
                    None,
                    &mut control_rx,
                    shutdown.clone(),
                    &mut on_ready,
                    None,
                )
                .await;
            if code == exit::OK {
                tracing::info!("stopped cleanly");
            }
            break 'run code;
        };
        notify::ready("connected; standby until the lease is acquired");
        if config.ha.partitions > 1 {
            if options.reset_identity {
                tracing::error!("--reset-identity cannot run with ha.partitions > 1: other instances may be syncing; stop every instance and run one with ha.partitions = 1 to reset");
                break 'run exit::INVALID_CONFIG;
            }
            let code = Box::pin(partitions::run(
                Arc::clone(&connected),
                coordinator,
                config,
                &mut control_rx,
                shutdown.clone(),
            ))
            .await;
            if code == exit::OK {
                tracing::info!("stopped cleanly");
            }
            break 'run code;
        }
        let mut config = config;
        let mut reset_identity = options.reset_identity;
        loop {
            let acquired = match connected
                .stand_by(&coordinator, &mut config, &mut control_rx, &shutdown)
                .await
            {
                Ok(Some(acquired)) => acquired,
                Ok(None) => break 'run exit::OK,
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the lease");
                    break 'run exit_code_for(&e);
                }
            };
            let term = shutdown.child_token();
            let stop_renewing = CancellationToken::new();
            let renewal = coordinator.spawn_renewal(&acquired, term.clone(), stop_renewing.clone());
            let code = connected
                .run_term(
                    config.clone(),
                    std::mem::take(&mut reset_identity),
                    Some(acquired.epoch),
                    &mut control_rx,
                    term.clone(),
                    &mut on_ready,
                    None,
                )
                .await;
            term.cancel();
            stop_renewing.cancel();
            let end = renewal.await.unwrap_or(crate::ha::TermEnd::Stopped);
            if end != crate::ha::TermEnd::Stopped {
                // Lost the lease: every write is already refused; wait for it again, with the
                // config file as it is now (reloads the last term applied included).
                coordinator.step_down();
                connected.forget_namespaces();
                if let Some(path) = &options.config_path {
                    match config::load(path) {
                        Ok(current) => config = current,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot re-read the configuration; the next term keeps the last one accepted")
                        }
                    }
                }
                continue;
            }
            coordinator.release(acquired.epoch).await;
            if code == exit::OK {
                tracing::info!("stopped cleanly");
            }
            break 'run code;
        }
    };
    close_clients(closing).await;
    code
}

/// What a running daemon keeps across active terms: the clients, identities and handles.
struct Connected {
    source: Source,
    dest_client: Client,
    /// Under `ha.enabled`: the leases' own destination connections, so renewals never queue
    /// behind the data writes for a pooled connection.
    lease_client: Option<Client>,
    identity: crate::metadata::SourceIdentity,
    dest_seen: identity::Observed,
    metrics: Metrics,
    status: Arc<StatusRegistry>,
    heartbeat: Arc<std::sync::atomic::AtomicU64>,
    reconnected: Arc<tokio::sync::Notify>,
    dest_hosts: String,
    control_tx: mpsc::Sender<Control>,
    http_addr: std::net::SocketAddr,
    /// Under `ha.partitions`: the one identity watch every partition's term shares (each term
    /// holding its own would race on the metadata epoch).
    shared_watch: std::sync::OnceLock<Arc<IdentityWatch>>,
    /// Under `ha.partitions`: the read-ahead memory budget every partition's term shares.
    shared_budget: std::sync::OnceLock<Arc<crate::source::buffer_budget::BufferBudget>>,
    /// Under `ha.partitions`: the copy slots every partition's term shares.
    shared_copy_slots: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

impl Connected {
    /// The lease coordinator under `ha.enabled`.
    fn coordinator(&self, config: &Config) -> Option<crate::ha::Coordinator> {
        if !config.ha.enabled {
            return None;
        }
        let lease = Duration::from_secs(config.ha.lease_seconds);
        let write_limit = config.destination.socket_timeout().unwrap_or(lease / 3);
        let store = crate::ha::LeaseStore::new(
            &self
                .lease_client
                .as_ref()
                .unwrap_or(&self.dest_client)
                .database(&config.checkpoint.database),
            &config.sync.id,
            0,
            crate::ha::instance_id(),
            crate::ha::advertised_address(self.http_addr),
            lease,
            lease / 3,
        );
        let coordinator = crate::ha::Coordinator::new(
            store,
            crate::bounded_write::server_time_limit(write_limit),
            Arc::clone(&self.status),
            &self.metrics,
        );
        coordinator.set_partition_count(config.ha.partitions);
        tracing::info!(instance = %coordinator.instance(), lease_seconds = config.ha.lease_seconds, "ha enabled; standby until the lease is acquired");
        Some(coordinator)
    }

    /// Waits as a standby until the lease is ours (`None` on shutdown). Keeps the heartbeat
    /// going, applies reloads to the next term's config, and refuses other controls.
    async fn stand_by(
        &self,
        coordinator: &crate::ha::Coordinator,
        config: &mut Config,
        control: &mut mpsc::Receiver<Control>,
        shutdown: &CancellationToken,
    ) -> Result<Option<crate::ha::Acquired>, SyncError> {
        let mut failures = 0u32;
        let mut beat = tokio::time::interval(Duration::from_millis(500));
        loop {
            // A stopping instance takes no lease: it would hold it, or leave it to expire if
            // the release failed, while a standby waits.
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            // An attempt runs to its end (its commands are bounded): dropped half-way, a lease
            // taken over from an expired owner could skip the wait for that owner's last writes.
            let attempt = coordinator.try_take();
            tokio::pin!(attempt);
            let attempt = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    _ = beat.tick() => {
                        self.heartbeat.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            };
            match attempt {
                // On shutdown the caller runs an empty term and releases the lease at once.
                Ok(Some(acquired)) => return Ok(Some(acquired)),
                Ok(None) => failures = 0,
                Err(e) if matches!(policy(&e), RetryDirective::Fatal { .. }) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(error = %e, "cannot read the lease; still a standby");
                    }
                }
            }
            let next_attempt = tokio::time::sleep(coordinator.poll_every());
            tokio::pin!(next_attempt);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = &mut next_attempt => break,
                    _ = beat.tick() => {
                        self.heartbeat.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    ctrl = control.recv() => match ctrl {
                        None | Some(Control::Shutdown) => return Ok(None),
                        Some(Control::Reload(new)) => *config = *new,
                        Some(_) => tracing::warn!("ignored: this instance is a standby; send it to the active instance"),
                    },
                }
            }
        }
    }

    /// A term that ended by losing the lease leaves nothing behind in status and metrics.
    fn forget_namespaces(&self) {
        for (ns, _) in self.status.snapshot() {
            self.metrics.remove_namespace(&ns);
        }
        self.status.clear_namespaces();
    }

    /// The start-up checks of the destination's metadata: checkpoints left without an identity
    /// record, and the source identity recorded there (DESIGN §2.10). `Ok(true)`: the identity
    /// was reset and the checkpoints discarded; `Err`: the exit code (OK on shutdown).
    async fn check_metadata(
        &self,
        config: &Config,
        reset_identity: bool,
        checkpoints: &CheckpointStore,
        term: &CancellationToken,
    ) -> Result<bool, u8> {
        let Connected {
            identity,
            dest_client,
            dest_hosts,
            ..
        } = self;
        let metadata_db = dest_client.database(&config.checkpoint.database);
        let metadata = Metadata::new(&metadata_db, config.destination.socket_timeout());
        if !reset_identity {
            // Metadata reads and writes at start-up retry transient errors like the connection
            // checks above: a failover or a blip must not exit the daemon.
            let orphans = || {
                identity::check_orphan_checkpoints(
                    &metadata_db,
                    checkpoints,
                    &config.sync.id,
                    config.sync.on_destination_reset,
                )
            };
            match retry_transient("destination", dest_hosts, term, orphans).await {
                Ok(None) => return Err(exit::OK),
                Ok(Some(false)) => {}
                Ok(Some(true)) => {
                    tracing::warn!("the destination's metadata was wiped under an earlier run (checkpoints without an identity record); discarded them, copying everything again (sync.on_destination_reset = \"recopy\")")
                }
                Err(e) if e.kind == ErrorKind::DestinationReset => {
                    tracing::error!(error = %e, "refusing to start");
                    return Err(exit::INVALID_CONFIG);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the metadata");
                    return Err(exit_code_for(&e));
                }
            }
        }
        let mut reset = false;
        let check = || metadata.check_identity(&config.sync.id, identity, reset_identity);
        match retry_transient("destination", dest_hosts, term, check)
            .await
            .map(|c| c.ok_or(()))
        {
            Ok(Err(())) => return Err(exit::OK),
            Ok(Ok(IdentityCheck::Recorded)) => {
                tracing::info!(source = %identity.describe(), "source identity recorded")
            }
            Ok(Ok(IdentityCheck::Matches)) => {}
            Ok(Ok(IdentityCheck::Reset)) => {
                reset = true;
                tracing::warn!(source = %identity.describe(), "source identity reset; discarding checkpoints and re-copying");
                if let Err(e) = checkpoints.delete_all(&config.sync.id).await {
                    tracing::error!(error = %e, "cannot discard checkpoints");
                    return Err(exit_code_for(&e));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "refusing to start");
                return Err(exit_code_for(&e));
            }
        }
        Ok(reset)
    }

    /// Records (or adopts) the destination's identity and metadata epoch and returns the
    /// watch that keeps checking both; `Err`: the exit code (OK on shutdown).
    async fn establish_watch(
        &self,
        config: &Config,
        term: &CancellationToken,
    ) -> Result<Arc<IdentityWatch>, u8> {
        let metadata_db = self.dest_client.database(&config.checkpoint.database);
        let establish = || {
            IdentityWatch::establish(
                self.source.clone(),
                self.dest_client.clone(),
                &metadata_db,
                config.destination.socket_timeout(),
                &config.sync.id,
                self.identity.clone(),
                &self.dest_seen,
                &self.metrics,
                Arc::clone(&self.status),
            )
        };
        match retry_transient("destination", &self.dest_hosts, term, establish).await {
            Ok(Some(w)) => Ok(w),
            Ok(None) => Err(exit::OK),
            Err(e) => {
                tracing::error!(error = %e, "cannot record the metadata epoch");
                Err(exit_code_for(&e))
            }
        }
    }

    /// One active term: metadata checks, then the supervisor until `term` ends. `epoch`: the
    /// lease held (`ha.enabled`), which every checkpoint write is conditional on. `own_beat`:
    /// where the term's heartbeat goes instead of the process's (a partition's term, whose
    /// beat the partition manager watches).
    #[allow(clippy::too_many_arguments)]
    async fn run_term(
        &self,
        config: Config,
        reset_identity: bool,
        epoch: Option<i64>,
        control: &mut mpsc::Receiver<Control>,
        term: CancellationToken,
        on_ready: &mut Option<tokio::sync::oneshot::Sender<RunningDaemon>>,
        own_beat: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> u8 {
        let Connected {
            source,
            dest_client,
            metrics,
            status,
            heartbeat,
            reconnected,
            dest_hosts,
            control_tx,
            http_addr,
            ..
        } = self;
        let heartbeat = own_beat.as_ref().unwrap_or(heartbeat);
        // Until the supervisor's own heartbeat takes over, the start-up steps (which retry
        // transient failures for as long as they last) keep /healthz and the watchdog alive.
        let startup_beat = {
            let (heartbeat, stop) = (Arc::clone(heartbeat), CancellationToken::new());
            let guard = stop.clone().drop_guard();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {
                            heartbeat.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
            guard
        };
        let metadata_db = dest_client.database(&config.checkpoint.database);
        let dest_op_timeout = config.destination.socket_timeout();
        let mut checkpoints = CheckpointStore::new(&metadata_db, dest_op_timeout);
        if let Some(epoch) = epoch {
            // From here on a deposed owner's checkpoint writes meet our epoch and fail.
            checkpoints = checkpoints.with_epoch(epoch);
            if config.ha.fencing == crate::config::FencingMode::Transaction {
                checkpoints = checkpoints.with_transaction_fencing();
            }
            let stamp = || async {
                match config
                    .ha
                    .term_partition
                    .filter(|_| config.ha.partitions > 1)
                {
                    Some(partition) => {
                        let partitioner = config.partitioner();
                        let owns = |ns: &str| partitioner.partition_of_ns(ns) == partition;
                        let prefix = format!("p{partition}/");
                        checkpoints
                            .stamp_partition_epoch(&config.sync.id, owns, &prefix)
                            .await
                    }
                    None => checkpoints.stamp_epoch(&config.sync.id).await,
                }
            };
            match retry_transient("destination", dest_hosts, &term, stamp).await {
                Ok(Some(())) => {}
                Ok(None) => return exit::OK,
                Err(e) => {
                    tracing::error!(error = %e, "cannot stamp the checkpoints with the lease epoch");
                    return exit_code_for(&e);
                }
            }
        }
        let metadata = Metadata::new(&metadata_db, dest_op_timeout);
        // Under ha.partitions the instance checked the metadata once, before its first lease.
        let partitioned = config.ha.term_partition.is_some() && config.ha.partitions > 1;
        let reset = if partitioned {
            false
        } else {
            match self
                .check_metadata(&config, reset_identity, &checkpoints, &term)
                .await
            {
                Ok(reset) => reset,
                Err(code) => return code,
            }
        };

        let watch = match self.shared_watch.get() {
            Some(shared) if partitioned => Arc::clone(shared),
            _ => match self.establish_watch(&config, &term).await {
                Ok(w) => w,
                Err(code) => return code,
            },
        };
        let new_budget = || {
            crate::source::buffer_budget::BufferBudget::new(
                config.apply.max_buffered_bytes as usize,
                metrics,
            )
        };
        // One memory budget for the process: the partitions' terms share it.
        let buffer = if partitioned {
            Arc::clone(self.shared_budget.get_or_init(new_budget))
        } else {
            new_budget()
        };
        // `copy.concurrent_collections` bounds the process: the partitions' terms share it.
        let new_slots = || {
            Arc::new(tokio::sync::Semaphore::new(
                config.copy.concurrent_collections as usize,
            ))
        };
        let copy_slots = if partitioned {
            Arc::clone(self.shared_copy_slots.get_or_init(new_slots))
        } else {
            new_slots()
        };
        let pipeline = Pipeline {
            source: source.clone(),
            dest: dest_client.clone(),
            checkpoints: checkpoints.clone(),
            metadata,
            metrics: metrics.clone(),
            status: Arc::clone(status),
            identity: Arc::clone(&watch),
            guard: DeleteGuard::new(config.sync.max_delete_fraction, metrics),
            buffer: Arc::clone(&buffer),
            streams: crate::source::shared_stream::SharedStreams::new(
                crate::source::shared_stream::SharedStreamSettings {
                    scope: config.source.stream_scope(),
                    collection_streams_max: config.source.collection_streams_max(),
                    sync_id: config.sync.id.clone(),
                    batch_max_events: config.apply.batch_max_events as usize,
                    batch_max_bytes: config.apply.batch_max_bytes as usize,
                    checkpoint_interval: Duration::from_secs(config.checkpoint.interval_seconds),
                    update_mode: config.apply.update_mode,
                    max_await: crate::worker::STREAM_MAX_AWAIT,
                    atomic_transactions: config.apply.transactions
                        == crate::config::TransactionMode::Atomic,
                    watermark_prefix: config
                        .ha
                        .term_partition
                        .filter(|_| config.ha.partitions > 1)
                        .map(|p| format!("p{p}/"))
                        .unwrap_or_default(),
                    partition: config
                        .ha
                        .term_partition
                        .filter(|_| config.ha.partitions > 1)
                        .map(|p| (config.partitioner(), p)),
                    namespaces: config.namespace_filter(),
                },
                source.clone(),
                checkpoints.clone(),
                metrics.clone(),
                Arc::clone(status),
                Arc::clone(&buffer),
            ),
            copy_slots,
        };
        if reset {
            // The operator accepted a new source and asked for everything to be copied again.
            pipeline.guard.confirm_first_runs();
        }
        let config = Arc::new(config);
        let supervisor = Supervisor::new(Arc::clone(&config), pipeline);
        let sup_heartbeat = Arc::clone(&supervisor.heartbeat);
        // The supervisor's own heartbeat drives /healthz and the watchdog.
        drop(startup_beat);
        let beat_cancel = CancellationToken::new();
        {
            let (from, to, cancel) = (
                Arc::clone(&sup_heartbeat),
                Arc::clone(heartbeat),
                beat_cancel.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => to.store(from.load(std::sync::atomic::Ordering::Relaxed), std::sync::atomic::Ordering::Relaxed),
                    }
                }
            });
        }
        let _stop_beat = beat_cancel.clone().drop_guard();
        if !partitioned {
            // Under ha.partitions the instance runs the shared watch's periodic check.
            watch.spawn_periodic(beat_cancel.clone(), Arc::clone(reconnected));
        }
        notify::ready("connected; starting workers");
        tracing::info!(http = %http_addr, sync_id = %config.sync.id, "running");
        if let Some(tx) = on_ready.take() {
            let _ = tx.send(RunningDaemon {
                metrics: metrics.clone(),
                status: Arc::clone(status),
                control: control_tx.clone(),
                http_addr: *http_addr,
            });
        }
        supervisor.run(control, term).await
    }
}

/// Shuts both clients down (sessions ended, pools closed) within a few seconds, so nothing of
/// the driver is left running when the runtime stops.
async fn close_clients((source, dest, lease): (Client, Client, Option<Client>)) {
    let both = async {
        tokio::join!(
            source.shutdown().immediate(true),
            dest.shutdown().immediate(true),
            async {
                if let Some(lease) = lease {
                    lease.shutdown().immediate(true).await;
                }
            }
        )
    };
    if tokio::time::timeout(Duration::from_secs(5), both)
        .await
        .is_err()
    {
        tracing::debug!("closing the MongoDB clients timed out");
    }
}

/// Connections of the lease client: a renewal and a standby's look, or a release.
const LEASE_POOL_SIZE: u32 = 2;

/// Under `ha.enabled`, a destination client for the leases alone: with the data writes
/// holding every pooled connection (hundreds of workers draining), a renewal that waited for
/// one could miss its deadline and depose a healthy active.
async fn build_lease_client(config: &Config) -> Result<Option<Client>, SyncError> {
    if !config.ha.enabled {
        return Ok(None);
    }
    let mut opts = config.destination_client_options().await?;
    opts.max_pool_size = Some(LEASE_POOL_SIZE);
    opts.min_pool_size = None;
    Client::with_options(opts)
        .map(Some)
        .map_err(|e| SyncError::mongo(ErrorKind::Config, "building the lease client", e))
}

/// The daemon's two clients. `watch`: the notification of every (re)connection, and where to
/// count open connections (status and metrics); none for the one-shot CLI commands.
async fn build_clients(
    config: &Config,
    watch: Option<(Arc<tokio::sync::Notify>, &StatusRegistry, &Metrics)>,
) -> Result<(Client, Client), SyncError> {
    let mut source_opts = config.source_client_options().await?;
    let mut dest_opts = config.destination_client_options().await?;
    if let Some((notify, status, metrics)) = watch {
        identity::notify_on_reconnect(&mut source_opts, Arc::clone(&notify));
        identity::notify_on_reconnect(&mut dest_opts, notify);
        crate::ops::connections::count_connections(
            &mut source_opts,
            &mut dest_opts,
            &status.connections,
            metrics,
        );
    }
    let source = Client::with_options(source_opts)
        .map_err(|e| SyncError::mongo(ErrorKind::Config, "building the source client", e))?;
    let dest = Client::with_options(dest_opts)
        .map_err(|e| SyncError::mongo(ErrorKind::Config, "building the destination client", e))?;
    Ok((source, dest))
}

/// Turns signals into shutdown and control messages.
fn spawn_signal_forwarder(
    mut signals: mpsc::Receiver<Signal>,
    shutdown: CancellationToken,
    control: mpsc::Sender<Control>,
    config_path: Option<PathBuf>,
    log_reload: Option<LogReloadHandle>,
    metrics: Metrics,
) {
    tokio::spawn(async move {
        while let Some(sig) = signals.recv().await {
            match sig {
                Signal::Shutdown => {
                    tracing::info!("shutdown requested; draining in-flight batches");
                    shutdown.cancel();
                }
                Signal::ForceSync => {
                    let _ = control
                        .send(Control::ForceSync {
                            namespaces: Vec::new(),
                            trigger: Trigger::Signal,
                        })
                        .await;
                }
                Signal::Validate => {
                    let _ = control
                        .send(Control::Validate {
                            namespaces: Vec::new(),
                        })
                        .await;
                }
                Signal::Reload => {
                    let Some(path) = &config_path else { continue };
                    notify::reloading();
                    match config::load(path) {
                        Ok(new) => {
                            for warning in &new.warnings {
                                tracing::warn!("{warning}");
                            }
                            if let Some(handle) = &log_reload {
                                if let Err(e) = handle.set_level(&new.log.level) {
                                    tracing::warn!(error = %e, "cannot change the log level");
                                }
                            }
                            metrics.config_reload(ReloadResult::Success);
                            let _ = control.send(Control::Reload(Box::new(new))).await;
                            tracing::info!(config = %path.display(), "configuration reload accepted");
                        }
                        Err(e) => {
                            metrics.config_reload(ReloadResult::Failure);
                            tracing::error!(config = %path.display(), error = %e, "new configuration rejected; keeping the running one");
                        }
                    }
                    notify::ready("configuration reloaded");
                }
            }
        }
    });
}

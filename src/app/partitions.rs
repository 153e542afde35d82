//! `ha.partitions` > 1 (DESIGN §2.12): namespaces are split into P partitions, each with its
//! own lease, and the live instances share them. This instance holds at most ceil(P/N) of them
//! (N: the live instances), runs one term (supervisor, workers, shared streams, watermarks) per
//! partition held, hands extras over gracefully when another instance has fewer, and takes
//! free ones while it has fewer. A failure moves only the failed instance's partitions.
//!
//! A lease that cannot be renewed in time stops every write of the process (the fence is the
//! earliest deadline of the leases held) and the instance steps down from all its partitions:
//! they are renewed together against one destination, so losing one means this instance cannot
//! be trusted with the others either. It then starts over as an instance with none.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::Connected;
use crate::{
    checkpoint::CheckpointStore,
    config::{partition::Partitioner, Config},
    exit,
    ha::{
        members::{fair_share, Members},
        Acquired, Coordinator, TermEnd,
    },
    status::{PartitionOwner, PartitionsView},
    supervisor::Control,
};

/// How long a partition's term may go without a heartbeat before the instance stops beating.
const TERM_STALL: Duration = Duration::from_secs(10);

/// One partition this instance runs.
struct Term {
    epoch: i64,
    coordinator: Coordinator,
    term: CancellationToken,
    stop_renewing: CancellationToken,
    renewal: JoinHandle<TermEnd>,
    task: JoinHandle<u8>,
    control: mpsc::Sender<Control>,
    /// Asked to drain so another instance can take the partition.
    handing_over: bool,
    /// The term's own heartbeat (its start-up steps, then its supervisor loop).
    beat: Arc<AtomicU64>,
    /// Whether `beat` moved within [`TERM_STALL`].
    beat_gate: crate::ops::notify::WatchdogGate,
}

/// What the destination says about the sync's instances and leases.
#[derive(Default)]
struct Look {
    live: Vec<crate::ha::members::Member>,
    owners: BTreeMap<u32, PartitionOwner>,
    highest_epoch: i64,
}

struct Manager {
    connected: Arc<Connected>,
    base: Coordinator,
    members: Members,
    partitioner: Partitioner,
    config: Config,
    terms: BTreeMap<u32, Term>,
    look: Look,
    layout_warned: bool,
    /// The destination's metadata was checked (once per instance, under its first lease:
    /// concurrent terms would race on an orphan check that discards every checkpoint).
    metadata_checked: bool,
    /// Stops the shared identity watch's periodic check when the instance stops.
    watch_cancel: CancellationToken,
    /// When the instances and leases were last read (a standby is ready while this is recent).
    last_contact: Option<std::time::Instant>,
}

/// Runs the partitioned instance until shutdown; returns the exit code.
pub(super) async fn run(
    connected: Arc<Connected>,
    base: Coordinator,
    config: Config,
    control: &mut mpsc::Receiver<Control>,
    shutdown: CancellationToken,
) -> u8 {
    let partitioner = config.partitioner();
    let members = Members::new(base.store().clone(), partitioner.layout());
    tracing::info!(partitions = partitioner.count(), layout = %partitioner.layout(), "partitioned: taking a fair share of the partitions' leases");
    let mut manager = Manager {
        connected,
        base,
        members,
        partitioner,
        config,
        terms: BTreeMap::new(),
        look: Look::default(),
        layout_warned: false,
        metadata_checked: false,
        watch_cancel: CancellationToken::new(),
        last_contact: None,
    };
    let _stop_watch = manager.watch_cancel.clone().drop_guard();
    let code = manager.run(control, &shutdown).await;
    let heartbeat = Arc::clone(&manager.connected.heartbeat);
    beating(&heartbeat, manager.stop_all()).await.max(code)
}

impl Manager {
    fn address(&self) -> String {
        crate::ha::advertised_address(self.connected.http_addr)
    }

    async fn run(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        shutdown: &CancellationToken,
    ) -> u8 {
        let mut beat = tokio::time::interval(Duration::from_millis(500));
        let mut failures = 0u32;
        let heartbeat = Arc::clone(&self.connected.heartbeat);
        loop {
            // The steps below wait on the destination (bounded, or retried while transient):
            // the heartbeat keeps moving meanwhile.
            if let Some(code) = beating(&heartbeat, self.reap()).await {
                return code;
            }
            match beating(&heartbeat, self.read_look()).await {
                Ok(()) => {
                    failures = 0;
                    self.last_contact = Some(std::time::Instant::now());
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(error = %e, "cannot read the instances and leases; keeping the partitions held");
                    }
                }
            }
            if failures == 0 {
                if let Err(code) = beating(&heartbeat, self.balance(shutdown)).await {
                    return code;
                }
            }
            self.show();
            let next = tokio::time::sleep(self.base.poll_every());
            tokio::pin!(next);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return exit::OK,
                    _ = &mut next => break,
                    _ = beat.tick() => {
                        if self.terms_alive() {
                            self.connected.heartbeat.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    ctrl = control.recv() => match ctrl {
                        None | Some(Control::Shutdown) => return exit::OK,
                        Some(other) => self.dispatch(other),
                    },
                }
            }
        }
    }

    /// Whether every term's loop moved within [`TERM_STALL`]: the process's heartbeat (what
    /// `/healthz` and the systemd watchdog watch) moves only then, so one hung partition is
    /// seen as a hung daemon, as it would be without partitions.
    fn terms_alive(&mut self) -> bool {
        let now = Instant::now();
        let mut alive = true;
        for t in self.terms.values_mut() {
            let moved = t.beat_gate.observe(t.beat.load(Ordering::Relaxed), now);
            alive &= moved || t.handing_over;
        }
        alive
    }

    async fn read_look(&mut self) -> Result<(), crate::error::SyncError> {
        let held: Vec<u32> = self.terms.keys().copied().collect();
        self.members.beat(&self.address(), &held).await?;
        let live = self.members.live().await?;
        let leases = self.base.store().all().await?;
        let mismatched: Vec<&str> = live
            .iter()
            .filter(|m| m.layout.as_deref() != Some(self.members.layout()))
            .map(|m| m.instance.as_str())
            .collect();
        if !mismatched.is_empty() && !self.layout_warned {
            tracing::error!(instances = ?mismatched, layout = %self.members.layout(),
                "live instances partition the namespaces differently (ha.partitions or ha.partition_overrides differ); taking no new partition until every instance runs the same [ha] section");
        }
        self.layout_warned = !mismatched.is_empty();
        self.look = Look {
            highest_epoch: leases.iter().map(|l| l.holder.epoch).max().unwrap_or(0),
            owners: leases
                .iter()
                .filter(|l| l.live && l.partition < self.partitioner.count())
                .filter_map(|l| {
                    Some((
                        l.partition,
                        PartitionOwner {
                            instance: l.holder.owner.clone()?,
                            address: l.holder.address.clone(),
                            epoch: l.holder.epoch,
                        },
                    ))
                })
                .collect(),
            live,
        };
        Ok(())
    }

    /// Hands extras over while another live instance has fewer than its share; takes free
    /// partitions while this one has fewer.
    async fn balance(&mut self, shutdown: &CancellationToken) -> Result<(), u8> {
        let share = fair_share(self.partitioner.count(), self.look.live.len());
        let me = self.base.instance().to_owned();
        let running = self.terms.values().filter(|t| !t.handing_over).count();
        if running > share {
            let deficit: usize = self
                .look
                .live
                .iter()
                .filter(|m| m.instance != me)
                .map(|m| {
                    let held = self
                        .look
                        .owners
                        .values()
                        .filter(|o| o.instance == m.instance)
                        .count();
                    share.saturating_sub(held)
                })
                .sum();
            let extras = (running - share).min(deficit);
            let giving: Vec<u32> = self
                .terms
                .iter()
                .rev()
                .filter(|(_, t)| !t.handing_over)
                .take(extras)
                .map(|(p, _)| *p)
                .collect();
            for p in giving {
                if let Some(t) = self.terms.get_mut(&p) {
                    tracing::info!(
                        partition = p,
                        share,
                        live = self.look.live.len(),
                        "handing a partition over to balance the instances"
                    );
                    t.handing_over = true;
                    t.term.cancel();
                }
            }
            return Ok(());
        }
        if running >= share || self.layout_warned {
            return Ok(());
        }
        let mut wanted = share - running;
        for p in 0..self.partitioner.count() {
            if wanted == 0 || shutdown.is_cancelled() {
                break;
            }
            if self.terms.contains_key(&p)
                || self.look.owners.get(&p).is_some_and(|o| o.instance != me)
            {
                continue;
            }
            let coordinator = self.base.for_partition(p);
            match coordinator.acquire(self.look.highest_epoch).await {
                Ok(Some(acquired)) => {
                    self.look.highest_epoch = self.look.highest_epoch.max(acquired.epoch);
                    if !self.metadata_checked {
                        self.check_metadata(&coordinator, &acquired, shutdown)
                            .await?;
                    }
                    self.start(p, coordinator, acquired, shutdown);
                    wanted -= 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot take a free partition's lease");
                    break;
                }
            }
        }
        Ok(())
    }

    /// The metadata checks of a term (DESIGN §2.10), run once, under the first lease taken
    /// (they write the identity record, which needs a lease).
    async fn check_metadata(
        &mut self,
        coordinator: &Coordinator,
        acquired: &Acquired,
        shutdown: &CancellationToken,
    ) -> Result<(), u8> {
        if acquired.took_over_from.is_some() {
            tokio::time::sleep(coordinator.write_bound()).await;
        }
        let checkpoints = CheckpointStore::new(
            &self
                .connected
                .dest_client
                .database(&self.config.checkpoint.database),
            self.config.destination.socket_timeout(),
        );
        // A wiped destination is not re-copied by one instance under the others (their
        // checkpoints and epochs): it stops, whatever sync.on_destination_reset says.
        let mut config = self.config.clone();
        config.sync.on_destination_reset = crate::config::OnDestinationReset::Stop;
        self.connected
            .check_metadata(&config, false, &checkpoints, shutdown)
            .await?;
        let watch = self.connected.establish_watch(&config, shutdown).await?;
        watch.spawn_periodic(
            self.watch_cancel.clone(),
            Arc::clone(&self.connected.reconnected),
        );
        let _ = self.connected.shared_watch.set(watch);
        self.metadata_checked = true;
        Ok(())
    }

    fn start(
        &mut self,
        partition: u32,
        coordinator: Coordinator,
        acquired: Acquired,
        shutdown: &CancellationToken,
    ) {
        let (control, mut rx) = mpsc::channel(32);
        let term = shutdown.child_token();
        let stop_renewing = CancellationToken::new();
        let renewal = coordinator.spawn_renewal(&acquired, term.clone(), stop_renewing.clone());
        let mut config = self.config.clone();
        config.ha.term_partition = Some(partition);
        // A lease taken over from a live owner: its last writes die within W.
        let wait = acquired
            .took_over_from
            .as_ref()
            .map(|_| coordinator.write_bound());
        let (connected, epoch, token) = (Arc::clone(&self.connected), acquired.epoch, term.clone());
        let beat = Arc::new(AtomicU64::new(0));
        let term_beat = Arc::clone(&beat);
        let task = tokio::spawn(async move {
            if let Some(wait) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = token.cancelled() => return exit::OK,
                }
            }
            connected
                .run_term(
                    config,
                    false,
                    Some(epoch),
                    &mut rx,
                    token,
                    &mut None,
                    Some(term_beat),
                )
                .await
        });
        self.terms.insert(
            partition,
            Term {
                epoch,
                coordinator,
                term,
                stop_renewing,
                renewal,
                task,
                control,
                handing_over: false,
                beat,
                beat_gate: crate::ops::notify::WatchdogGate::new(TERM_STALL, 0, Instant::now()),
            },
        );
    }

    /// Ends what has ended: handed-over partitions are released; a lost lease steps the
    /// instance down from every partition; a term that failed on its own stops the instance
    /// with its exit code.
    async fn reap(&mut self) -> Option<u8> {
        if self.terms.values().any(|t| t.renewal.is_finished()) {
            self.step_down_all().await;
            return None;
        }
        let ended: Vec<u32> = self
            .terms
            .iter()
            .filter(|(_, t)| t.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            let Some(t) = self.terms.remove(&p) else {
                continue;
            };
            let handing_over = t.handing_over;
            let (code, lost) = self.finish(p, t).await;
            if lost {
                // The term ended on a write the fence refused: the lease had lapsed.
                self.step_down_all().await;
                return None;
            }
            if !handing_over && code != exit::OK {
                tracing::error!(
                    partition = p,
                    code,
                    "a partition's term failed; stopping the instance"
                );
                return Some(code);
            }
        }
        None
    }

    /// Releases a partition whose term has ended; returns the term's exit code and whether
    /// its lease was lost.
    async fn finish(&mut self, partition: u32, t: Term) -> (u8, bool) {
        let code = t.task.await.unwrap_or(exit::RUNTIME_FAILURE);
        t.stop_renewing.cancel();
        let end = t.renewal.await.unwrap_or(TermEnd::Stopped);
        let lost = end != TermEnd::Stopped;
        if lost {
            crate::fence::PROCESS.forget(partition);
        } else {
            t.coordinator.release(t.epoch).await;
        }
        self.forget_namespaces_of(partition);
        (code, lost)
    }

    /// A lease was lost: every write is already refused. Ends every term, gives up the other
    /// leases, and starts over holding none.
    async fn step_down_all(&mut self) {
        tracing::error!(partitions = ?self.terms.keys().collect::<Vec<_>>(), "a partition's lease was lost; stepping down from every partition");
        for t in self.terms.values() {
            t.term.cancel();
        }
        let terms = std::mem::take(&mut self.terms);
        for (p, t) in terms {
            let _ = self.finish(p, t).await;
        }
        self.connected.forget_namespaces();
    }

    /// Shutdown: every term drains and checkpoints under its renewed lease, then releases it.
    async fn stop_all(&mut self) -> u8 {
        for t in self.terms.values() {
            t.term.cancel();
        }
        let mut code = exit::OK;
        let terms = std::mem::take(&mut self.terms);
        for (p, t) in terms {
            // A term that lost its lease while draining failed on the fence, not on its own.
            let (term_code, lost) = self.finish(p, t).await;
            if !lost {
                code = code.max(term_code);
            }
        }
        if let Err(e) = self.members.leave().await {
            tracing::warn!(error = %e, "cannot leave the live instances; the others see it after a lease");
        }
        self.show();
        code
    }

    fn forget_namespaces_of(&self, partition: u32) {
        let partitioner = &self.partitioner;
        let status = &self.connected.status;
        for (ns, _) in status.snapshot() {
            if partitioner.partition_of_ns(&ns) == partition {
                self.connected.metrics.remove_namespace(&ns);
            }
        }
        status.clear_namespaces_where(|ns| partitioner.partition_of_ns(ns) == partition);
    }

    fn show(&self) {
        self.base.show_partitions(
            PartitionsView {
                partitioner: self.partitioner.clone(),
                held: self
                    .terms
                    .iter()
                    .filter(|(_, t)| !t.handing_over)
                    .map(|(p, t)| (*p, t.epoch))
                    .collect(),
                owners: self.look.owners.clone(),
                live_instances: self.look.live.len(),
            },
            self.last_contact,
        );
    }

    /// Routes a control message to the terms of the partitions it concerns.
    fn dispatch(&mut self, control: Control) {
        match control {
            Control::Shutdown => {}
            Control::Reload(mut new) => {
                if Partitioner::from_config(&new.ha) != self.partitioner {
                    tracing::error!("ha.partitions and ha.partition_overrides cannot change on reload (the instances would disagree on who syncs what); restart every instance with the new [ha] section. The rest of the reload applies.");
                    new.ha = self.config.ha.clone();
                }
                self.config = (*new).clone();
                for (p, t) in &self.terms {
                    let mut config = (*new).clone();
                    config.ha.term_partition = Some(*p);
                    send(t, Control::Reload(Box::new(config)));
                }
            }
            Control::ForceSync {
                namespaces,
                trigger,
            } => self.route(namespaces, |namespaces| Control::ForceSync {
                namespaces,
                trigger,
            }),
            Control::Validate { namespaces } => {
                self.route(namespaces, |namespaces| Control::Validate { namespaces })
            }
            Control::Confirm { namespaces } => {
                self.route(namespaces, |namespaces| Control::Confirm { namespaces })
            }
        }
    }

    fn route(&self, namespaces: Vec<String>, make: impl Fn(Vec<String>) -> Control) {
        if namespaces.is_empty() {
            for t in self.terms.values().filter(|t| !t.handing_over) {
                send(t, make(Vec::new()));
            }
            return;
        }
        let mut by_partition: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for ns in namespaces {
            by_partition
                .entry(self.partitioner.partition_of_ns(&ns))
                .or_default()
                .push(ns);
        }
        for (p, namespaces) in by_partition {
            match self.terms.get(&p) {
                Some(t) => send(t, make(namespaces)),
                None => {
                    tracing::warn!(partition = p, namespaces = ?namespaces, "ignored: these namespaces are synced by another instance")
                }
            }
        }
    }
}

/// Awaits `step`, moving `heartbeat` every half second meanwhile.
async fn beating<T>(heartbeat: &AtomicU64, step: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(step);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            out = &mut step => return out,
            _ = tick.tick() => {
                heartbeat.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn send(t: &Term, control: Control) {
    if t.control.try_send(control).is_err() {
        tracing::warn!(
            partition = t.coordinator.partition(),
            "a partition's term is not taking requests (busy or ending); request dropped"
        );
    }
}

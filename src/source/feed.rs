//! Where a worker's change events come from (DESIGN §2.11): its own collection stream, a
//! shared stream it joined, or, while it joins, its own stream up to the shared stream's
//! position and the shared stream after it. Nothing is skipped and nothing repeated at the
//! switch; after a restart from a shared watermark, events at or before the worker's applied
//! position are skipped.

use std::sync::Arc;

use bson::{Document, RawDocumentBuf, Timestamp};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    error::{ErrorKind, SyncError},
    model::event::{raw_token, token_after, token_cluster_time, FragmentAssembler},
    model::transaction::TxnKey,
    source::buffer_budget::BufferBudget,
    source::shared_stream::{StreamItem, Subscription},
    source::{serialize_token, Namespace, Source, StreamSettings, StreamStart},
};

/// How much longer than `maxAwaitTimeMS` an awaiting `getMore` may stay unanswered before the
/// reader gives the connection up as half-open and reopens the stream from the checkpoint.
pub const READER_WATCHDOG_MARGIN: std::time::Duration = std::time::Duration::from_secs(15);

/// What a worker's own collection stream reads, and with which bounds.
pub struct OwnStreamSpec {
    pub source: Source,
    pub ns: Namespace,
    pub settings: StreamSettings,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub budget: Arc<BufferBudget>,
}

/// Where an own collection stream opens.
#[derive(Debug, Clone)]
pub enum OwnStart {
    After(Document),
    AtOperationTime(Timestamp),
    Now,
}

/// The later of two positions (by resume token order).
fn later(a: Option<RawDocumentBuf>, b: Option<RawDocumentBuf>) -> Option<RawDocumentBuf> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if token_after(&b, &a) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// A worker's event source.
pub struct Feed {
    own: Option<Reader>,
    shared: Option<Subscription>,
    /// While joining: the shared stream's position at the join. Own events after it are the
    /// shared stream's to deliver.
    join_at: Option<RawDocumentBuf>,
    /// Events at or before this position were applied already.
    skip_through: Option<RawDocumentBuf>,
    /// Events skipped as already applied, since the last call of [`Feed::take_skipped`].
    skipped: u64,
    skipped_transactions: Vec<TxnKey>,
    /// The worker's applied position beyond its own checkpoint's token, when it knows one (a
    /// shared idle mark, a shared watermark, its own stream's idle token).
    position: Option<RawDocumentBuf>,
    stop: CancellationToken,
    /// The namespace (logs).
    label: String,
}

impl Feed {
    pub fn new(stop: &CancellationToken, label: String) -> Feed {
        Feed {
            own: None,
            shared: None,
            join_at: None,
            skip_through: None,
            skipped: 0,
            skipped_transactions: Vec::new(),
            position: None,
            stop: stop.clone(),
            label,
        }
    }

    /// The worker has applied everything up to `token` (a position past its checkpoint).
    pub fn note_position(&mut self, token: &Document) {
        self.position = later(self.position.take(), raw_token(token));
    }

    /// The worker's applied position: the later of its checkpoint's token and what it knows.
    pub fn effective(&self, checkpoint_token: Option<&Document>) -> Option<RawDocumentBuf> {
        later(checkpoint_token.and_then(raw_token), self.position.clone())
    }

    /// (Re)opens the own collection stream at the worker's applied position: after the
    /// checkpoint's token, or, when the worker knows a later position that is not its own
    /// stream's token, at that position's cluster time, skipping what it had applied.
    pub fn open_own(
        &mut self,
        spec: &OwnStreamSpec,
        checkpoint_token: Option<&Document>,
        configured: Option<Timestamp>,
    ) {
        self.own = None;
        let own_token = checkpoint_token.and_then(raw_token);
        let start = match (&own_token, &self.position) {
            (own, Some(p)) if own.as_ref().is_none_or(|o| token_after(p, o)) => {
                match token_cluster_time(p) {
                    Some(ts) => {
                        self.skip_through = Some(p.clone());
                        OwnStart::AtOperationTime(ts)
                    }
                    None => own_start(checkpoint_token, configured),
                }
            }
            _ => own_start(checkpoint_token, configured),
        };
        self.own = Some(Reader::spawn(spec, &start, &self.stop));
    }

    /// The own stream's settings, when it reads one.
    pub fn own_settings(&self) -> Option<&StreamSettings> {
        self.own.as_ref().map(|r| &r.settings)
    }

    /// Reading the shared stream only.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some() && self.join_at.is_none()
    }

    /// Joined, but its own stream must first read up to the join position (the caller opens
    /// it when it is not open yet).
    pub fn is_joining(&self) -> bool {
        self.shared.is_some() && self.join_at.is_some()
    }

    /// What the worker reads, for the status: `collection`, a shared stream's name, or
    /// `joining <name>`; None before any stream is open.
    pub fn describe(&self) -> Option<String> {
        match (&self.shared, self.join_at.is_some(), &self.own) {
            (Some(sub), false, _) => Some(sub.stream.clone()),
            (Some(sub), true, _) => Some(format!("joining {}", sub.stream)),
            (None, _, Some(_)) => Some("collection".to_string()),
            (None, _, None) => None,
        }
    }

    /// The shared stream's name, while a member.
    pub fn shared_name(&self) -> Option<&str> {
        self.shared.as_ref().map(|s| s.stream.as_str())
    }

    /// Joins a shared stream. A worker already at or past the join position switches now
    /// (skipping what it had applied); otherwise its own stream reads on up to it.
    pub fn join(&mut self, subscription: Subscription, checkpoint_token: Option<&Document>) {
        let applied = self.effective(checkpoint_token);
        let caught_up = applied
            .as_ref()
            .is_some_and(|a| !token_after(&subscription.at, a));
        if caught_up {
            self.own = None;
            self.join_at = None;
            self.skip_through = applied;
        } else {
            self.join_at = Some(subscription.at.clone());
        }
        self.shared = Some(subscription);
    }

    /// Leaves the shared stream (the caller opens its own stream).
    pub fn leave_shared(&mut self) {
        self.shared = None;
        self.join_at = None;
    }

    /// Tells the shared stream what is applied: everything up to the worker's position (the
    /// checkpoint, or a later position noted from a watermark). Call after a batch is
    /// checkpointed, or at an idle mark.
    pub fn acknowledge(&self, checkpoint_token: Option<&Document>) {
        if let (Some(sub), Some(position)) = (&self.shared, self.effective(checkpoint_token)) {
            sub.acknowledge(&position, self.is_shared());
        }
    }

    /// Events skipped as already applied since the last call.
    /// Source transactions some of whose events were skipped as already applied (see
    /// [`crate::model::transaction::TxnGroup::excuse`]).
    pub fn take_skipped_transactions(&mut self) -> Vec<TxnKey> {
        std::mem::take(&mut self.skipped_transactions)
    }

    pub fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }

    /// Items waiting in the queue being read.
    pub fn queued(&self) -> usize {
        match (&self.own, &self.shared) {
            (Some(own), _) => own.rx.len(),
            (None, Some(sub)) => sub.rx.len(),
            (None, None) => 0,
        }
    }

    /// The next item. Cancel-safe: state changes only after an item was received.
    pub async fn recv(&mut self) -> Option<StreamItem> {
        loop {
            if self.join_at.is_some() && self.own.is_none() {
                // Joining needs the own stream up to the join position; without one, the
                // shared stream cannot be read exactly: start over on the own stream.
                self.leave_shared();
                return Some(StreamItem::Stalled);
            }
            let from_own = self.own.is_some();
            let item = if let Some(own) = self.own.as_mut() {
                own.rx.recv().await
            } else if let Some(sub) = self.shared.as_mut() {
                let next = tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => return None,
                    i = sub.rx.recv() => i,
                };
                match next {
                    Some(i) => Some(i),
                    None => {
                        // Evicted, or the shared reader ended: read the own stream again.
                        self.leave_shared();
                        return Some(StreamItem::Stalled);
                    }
                }
            } else {
                return None;
            };
            if from_own {
                if let Some(at) = &self.join_at {
                    let reached = match &item {
                        Some(StreamItem::Event(ev, _)) => token_after(&ev.token, at),
                        Some(StreamItem::Idle { token, .. }) => {
                            raw_token(token).is_some_and(|t| !token_after(at, &t))
                        }
                        _ => false,
                    };
                    if reached {
                        // Everything of this namespace up to the join position is read: the
                        // shared stream delivers the rest.
                        self.own = None;
                        self.join_at = None;
                        tracing::info!(namespace = %self.label, stream = self.shared_name().unwrap_or_default(), "own change stream caught up with the shared one; reading the shared change stream now");
                        continue;
                    }
                }
            }
            if let Some(StreamItem::Event(ev, _)) = &item {
                if let Some(skip) = &self.skip_through {
                    if token_after(&ev.token, skip) {
                        self.skip_through = None;
                    } else {
                        self.skipped += 1;
                        if let Some(txn) = TxnKey::of(ev) {
                            self.skipped_transactions.push(txn);
                        }
                        continue;
                    }
                }
            }
            return item;
        }
    }

    /// Stops the own reader (queued events are dropped: they are re-read after the
    /// checkpoint) and leaves the shared stream.
    pub async fn close(&mut self) {
        self.shared = None;
        if let Some(own) = self.own.take() {
            own.close().await;
        }
    }
}

fn own_start(checkpoint_token: Option<&Document>, configured: Option<Timestamp>) -> OwnStart {
    match (checkpoint_token, configured) {
        (Some(t), _) => OwnStart::After(t.clone()),
        (None, Some(ts)) => OwnStart::AtOperationTime(ts),
        (None, None) => OwnStart::Now,
    }
}

/// Reads the change stream into the bounded queue. Every awaiting `getMore` (and the opening
/// `aggregate`) is bounded by `max_await` + [`READER_WATCHDOG_MARGIN`]: an unanswered one (a
/// half-open connection) ends the reader with [`StreamItem::Stalled`] instead of hanging the
/// namespace forever.
#[allow(clippy::too_many_arguments)]
async fn read_events(
    source: Source,
    ns: Namespace,
    start_after: Option<Document>,
    start_at: Option<Timestamp>,
    settings: StreamSettings,
    tx: mpsc::Sender<StreamItem>,
    budget: Arc<BufferBudget>,
    reader_share: usize,
    stop: CancellationToken,
) {
    let watchdog = settings.max_await + READER_WATCHDOG_MARGIN;
    let stalled = || {
        tracing::warn!(namespace = %ns, watchdog_s = watchdog.as_secs(), "change stream stalled: the source did not answer within the watchdog bound; reopening it from the last checkpoint");
    };
    // This reader's share of the daemon's budget.
    let share = Arc::new(Semaphore::new(reader_share));
    let result: Result<(), SyncError> = async {
        let start = match (&start_after, start_at) {
            (Some(token), _) => StreamStart::After(token),
            (None, Some(ts)) => StreamStart::AtOperationTime(ts),
            (None, None) => StreamStart::Now,
        };
        let opened = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            r = tokio::time::timeout(watchdog, source.open_stream(&ns, start, &settings)) => r,
        };
        let Ok(opened) = opened else {
            stalled();
            let _ = tx.send(StreamItem::Stalled).await;
            return Ok(());
        };
        let mut stream = opened?;
        let mut assembler = FragmentAssembler::default();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            // An event the driver holds already is taken without arming the watchdog (a timer
            // per event is a measurable share of a drain): only a getMore can stall.
            let next = {
                let next = stream.next_if_any();
                tokio::pin!(next);
                match futures::poll!(next.as_mut()) {
                    std::task::Poll::Ready(r) => Ok(r),
                    std::task::Poll::Pending => tokio::select! {
                        biased;
                        _ = stop.cancelled() => return Ok(()),
                        r = tokio::time::timeout(watchdog, next) => r,
                    },
                }
            };
            let Ok(next) = next else {
                stalled();
                let _ = tx.send(StreamItem::Stalled).await;
                return Ok(());
            };
            match next.map_err(|e| SyncError::mongo(ErrorKind::SourceRead, format!("reading the change stream of {ns}"), e))? {
                Some(raw) => {
                    let Some(event) = assembler.push(raw)? else { continue };
                    let permit = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        p = budget.acquire(&share, reader_share, event.size()) => p.map_err(|_| SyncError::new(ErrorKind::Cancelled, "shutting down"))?,
                    };
                    if tx.send(StreamItem::Event(event, permit)).await.is_err() {
                        return Ok(());
                    }
                }
                None => {
                    if assembler.is_empty() {
                        if let Some(token) = stream.resume_token() {
                            let token = serialize_token(&token)?;
                            let cluster_time = RawDocumentBuf::try_from(&token).ok().and_then(|t| token_cluster_time(&t));
                            if tx.send(StreamItem::Idle { token, cluster_time }).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    if !stream.is_alive() {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = tx.send(StreamItem::Failed(e)).await;
    }
}

/// One running reader task and the receiving end of its queue.
struct Reader {
    rx: mpsc::Receiver<StreamItem>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    /// What the stream was opened with (a reload that changes it reopens the stream).
    settings: StreamSettings,
}

impl Reader {
    fn spawn(spec: &OwnStreamSpec, start: &OwnStart, stop: &CancellationToken) -> Reader {
        let (tx, rx) = mpsc::channel::<StreamItem>((spec.batch_max_events * 2).max(2));
        let reader_stop = stop.child_token();
        let (start_after, start_at) = match start {
            OwnStart::After(token) => (Some(token.clone()), None),
            OwnStart::AtOperationTime(ts) => (None, Some(*ts)),
            OwnStart::Now => (None, None),
        };
        let task = tokio::spawn(read_events(
            spec.source.clone(),
            spec.ns.clone(),
            start_after,
            start_at,
            spec.settings.clone(),
            tx,
            Arc::clone(&spec.budget),
            spec.budget.reader_share(spec.batch_max_bytes),
            reader_stop.clone(),
        ));
        Reader {
            rx,
            stop: reader_stop,
            task: Some(task),
            settings: spec.settings.clone(),
        }
    }

    /// Stops the reader task; queued events are dropped (they are re-read after the
    /// checkpoint).
    async fn close(mut self) {
        self.stop.cancel();
        // A reader blocked on a full queue sees it closed.
        self.rx.close();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Reader {
    /// Whatever happens to the streaming loop, the reader stops with it.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn same_stream(a: &StreamSettings, b: &StreamSettings) -> bool {
    a.update_lookup == b.update_lookup
        && a.post_images == b.post_images
        && a.pre_images == b.pre_images
        && a.max_await == b.max_await
        && a.batch_size == b.batch_size
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::model::event::ChangeEvent;
    use bson::doc;

    fn token(n: u64) -> Document {
        doc! {"_data": format!("82{n:016X}")}
    }

    fn event(n: u64, budget: &Arc<BufferBudget>, share: &Arc<Semaphore>) -> StreamItem {
        let raw = raw_token(&doc! {
            "_id": token(n),
            "operationType": "insert",
            "clusterTime": Timestamp { time: n as u32, increment: 0 },
            "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": n as i64},
            "fullDocument": {"_id": n as i64},
        })
        .unwrap();
        let permit = futures::executor::block_on(budget.acquire(share, 1 << 20, 10)).unwrap();
        StreamItem::Event(ChangeEvent::parse(raw).unwrap(), permit)
    }

    fn own_reader(rx: mpsc::Receiver<StreamItem>) -> Reader {
        Reader {
            rx,
            stop: CancellationToken::new(),
            task: None,
            settings: StreamSettings::default(),
        }
    }

    async fn drain(feed: &mut Feed, n: usize) -> Vec<u64> {
        let mut seen = Vec::new();
        for _ in 0..n {
            match tokio::time::timeout(std::time::Duration::from_millis(200), feed.recv()).await {
                Ok(Some(StreamItem::Event(ev, _))) => {
                    seen.push(ev.cluster_time.time as u64);
                }
                _ => break,
            }
        }
        seen
    }

    fn budget() -> (Arc<BufferBudget>, Arc<Semaphore>) {
        (
            BufferBudget::new(1 << 24, &Metrics::new(500)),
            Arc::new(Semaphore::new(1 << 20)),
        )
    }

    #[tokio::test]
    async fn a_worker_behind_the_shared_stream_reads_its_own_stream_up_to_the_join_then_switches() {
        let (b, s) = budget();
        let stop = CancellationToken::new();
        let mut feed = Feed::new(&stop, "d.c".into());
        let (own_tx, own_rx) = mpsc::channel(16);
        feed.own = Some(own_reader(own_rx));
        // Applied through 2; the shared reader is at 4.
        let (shared_tx, shared_rx) = mpsc::channel(16);
        feed.join(
            Subscription::for_test(shared_rx, raw_token(&token(4)).unwrap()),
            Some(&token(2)),
        );
        assert!(feed.is_joining());
        for n in 3..=6 {
            own_tx.send(event(n, &b, &s)).await.unwrap();
        }
        for n in 5..=7 {
            shared_tx.send(event(n, &b, &s)).await.unwrap();
        }
        // 3 and 4 from its own stream, own 5 hands over, then 5, 6, 7 from the shared one.
        assert_eq!(drain(&mut feed, 10).await, vec![3, 4, 5, 6, 7]);
        assert!(feed.is_shared());
        assert_eq!(feed.take_skipped(), 0);
    }

    /// Soak seed 350027: with batches in flight, a worker acknowledged every event it had
    /// received when an older batch was checkpointed. The reader then took the member as
    /// having applied everything, its next batch failed, and the restarted worker resumed
    /// past that batch's events: an update was lost. An acknowledgement covers what the
    /// checkpoint covers, not what was received.
    #[tokio::test]
    async fn an_acknowledgement_covers_what_is_checkpointed_not_everything_received() {
        let (b, s) = budget();
        let stop = CancellationToken::new();
        let mut feed = Feed::new(&stop, "d.c".into());
        let raw = |n| raw_token(&token(n)).unwrap();
        let (shared_tx, shared_rx) = mpsc::channel(16);
        let subscription = Subscription::for_test(shared_rx, raw(2));
        let reader = subscription.reader_view();
        feed.join(subscription, Some(&token(2)));
        assert!(feed.is_shared());
        for n in 3..=6 {
            reader.routing(&raw(n - 1), &raw(n));
            shared_tx.send(event(n, &b, &s)).await.unwrap();
        }
        assert_eq!(drain(&mut feed, 4).await, vec![3, 4, 5, 6]);
        // Events 3 and 4 are written and checkpointed; 5 and 6 are still being written.
        feed.acknowledge(Some(&token(4)));
        assert_eq!(
            reader.owes_from(&raw(6)),
            Some(raw(4)),
            "events 5 and 6 were received, not applied"
        );
        feed.acknowledge(Some(&token(6)));
        assert_eq!(reader.owes_from(&raw(6)), None);
    }

    #[tokio::test]
    async fn a_worker_ahead_of_the_shared_stream_switches_at_once_and_skips_what_it_applied() {
        let (b, s) = budget();
        let stop = CancellationToken::new();
        let mut feed = Feed::new(&stop, "d.c".into());
        let (_own_tx, own_rx) = mpsc::channel(16);
        feed.own = Some(own_reader(own_rx));
        // Applied through 6; the shared reader is at 3.
        let (shared_tx, shared_rx) = mpsc::channel(16);
        feed.join(
            Subscription::for_test(shared_rx, raw_token(&token(3)).unwrap()),
            Some(&token(6)),
        );
        assert!(feed.is_shared());
        for n in 4..=8 {
            shared_tx.send(event(n, &b, &s)).await.unwrap();
        }
        assert_eq!(drain(&mut feed, 10).await, vec![7, 8]);
        assert_eq!(feed.take_skipped(), 3);
    }

    #[tokio::test]
    async fn an_own_idle_mark_at_the_join_position_hands_over() {
        let (b, s) = budget();
        let stop = CancellationToken::new();
        let mut feed = Feed::new(&stop, "d.c".into());
        let (own_tx, own_rx) = mpsc::channel(16);
        feed.own = Some(own_reader(own_rx));
        let (shared_tx, shared_rx) = mpsc::channel(16);
        feed.join(
            Subscription::for_test(shared_rx, raw_token(&token(4)).unwrap()),
            Some(&token(2)),
        );
        own_tx.send(event(3, &b, &s)).await.unwrap();
        own_tx
            .send(StreamItem::Idle {
                token: token(4),
                cluster_time: None,
            })
            .await
            .unwrap();
        shared_tx.send(event(9, &b, &s)).await.unwrap();
        assert_eq!(drain(&mut feed, 10).await, vec![3, 9]);
    }

    #[tokio::test]
    async fn a_join_behind_the_reader_without_an_own_stream_waits_for_one() {
        let stop = CancellationToken::new();
        let mut feed = Feed::new(&stop, "d.c".into());
        let (_shared_tx, shared_rx) = mpsc::channel(16);
        feed.join(
            Subscription::for_test(shared_rx, raw_token(&token(5)).unwrap()),
            Some(&token(2)),
        );
        assert!(feed.is_joining(), "3..5 must come from the own stream");
        assert!(!feed.is_shared());
        // Read without opening it: never the shared queue, a request for the own stream.
        assert!(matches!(feed.recv().await, Some(StreamItem::Stalled)));
        assert!(!feed.is_joining());
    }

    #[tokio::test]
    async fn a_closed_shared_queue_asks_for_the_own_stream_again() {
        let stop = CancellationToken::new();
        let mut feed = Feed::new(&stop, "d.c".into());
        let (shared_tx, shared_rx) = mpsc::channel(16);
        feed.join(
            Subscription::for_test(shared_rx, raw_token(&token(1)).unwrap()),
            Some(&token(1)),
        );
        drop(shared_tx);
        assert!(matches!(feed.recv().await, Some(StreamItem::Stalled)));
        assert!(!feed.is_shared());
    }
}

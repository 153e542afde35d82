//! Write turns: a batch prepared while the batch before it is still being written waits for
//! its turn before it touches the destination, so the destination sees batches in stream
//! order while the daemon builds the next batch's statements (issue 11 item 4).
//!
//! The turn is a task-local of the task applying the batch: the applier's destination
//! operations ([`wait`]) pass at once outside a turn (copy, repair, transactions) and, inside
//! one, wait until the previous batch has finished every write, its repairs included.

use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};
use tokio::sync::oneshot;

use crate::error::{ErrorKind, SyncError};

tokio::task_local! {
    static TURN: Turn;
}

/// Resolves when the batch before has finished writing: `true` when it succeeded.
#[derive(Clone)]
pub struct Turn(Shared<BoxFuture<'static, bool>>);

/// Held by a batch while it writes; finishing (or dropping) it hands the turn on.
pub struct TurnDone(oneshot::Sender<bool>);

impl TurnDone {
    /// Hands the turn to the next batch; `succeeded: false` makes the next batch fail before
    /// it writes anything (the worker stops on this batch's error).
    pub fn finish(self, succeeded: bool) {
        let _ = self.0.send(succeeded);
    }
}

/// A new link of the chain: the batch holding the [`TurnDone`] writes first, the batch given
/// the [`Turn`] after it.
pub fn chain() -> (TurnDone, Turn) {
    let (tx, rx) = oneshot::channel::<bool>();
    // A dropped sender (the batch's task was aborted) is a failure: nothing may follow it.
    let turn = Turn(rx.map(|r| r.unwrap_or(false)).boxed().shared());
    (TurnDone(tx), turn)
}

impl Turn {
    /// Waits for the turn: `true` when the batch before succeeded.
    pub async fn come(self) -> bool {
        self.0.await
    }

    /// A turn that comes once `self` and `other` both have: `true` when both succeeded (it
    /// comes as `false` as soon as `self` does).
    pub fn and(self, other: Turn) -> Turn {
        Turn(
            async move { self.come().await && other.come().await }
                .boxed()
                .shared(),
        )
    }
}

/// Runs `f` as a batch whose destination operations wait for `turn` (none: they do not wait).
pub async fn in_turn<F: std::future::Future>(turn: Option<Turn>, f: F) -> F::Output {
    match turn {
        Some(t) => TURN.scope(t, f).await,
        None => f.await,
    }
}

/// Waits until the batch being applied may touch the destination.
pub async fn wait() -> Result<(), SyncError> {
    let Ok(turn) = TURN.try_with(|t| t.0.clone()) else {
        return Ok(());
    };
    if turn.await {
        Ok(())
    } else {
        Err(SyncError::new(
            ErrorKind::Cancelled,
            "the batch before this one did not finish writing",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn a_batch_writes_only_after_the_one_before_finished() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let (first_done, second_turn) = chain();
        let log = Arc::clone(&order);
        let second = tokio::spawn(in_turn(Some(second_turn), async move {
            log.lock().unwrap().push("second prepared");
            wait().await.unwrap();
            log.lock().unwrap().push("second wrote");
        }));
        tokio::task::yield_now().await;
        order.lock().unwrap().push("first wrote");
        first_done.finish(true);
        second.await.unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            ["second prepared", "first wrote", "second wrote"]
        );
    }

    #[tokio::test]
    async fn a_combined_turn_comes_after_both_and_fails_with_either() {
        let (first_done, first) = chain();
        let (second_done, second) = chain();
        let both = first.and(second);
        let waiting = tokio::spawn(in_turn(Some(both.clone()), wait()));
        second_done.finish(true);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the first has not come yet");
        first_done.finish(true);
        waiting.await.unwrap().unwrap();
        assert!(both.come().await);

        let (failed, first) = chain();
        let (_never, second) = chain();
        failed.finish(false);
        assert!(
            !first.and(second).come().await,
            "a failed first turn ends the wait without the second"
        );
        let (first_done, first) = chain();
        let (second_done, second) = chain();
        first_done.finish(true);
        drop(second_done);
        assert!(in_turn(Some(first.and(second)), wait()).await.is_err());
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_batch_stops_the_next_one_writing() {
        let (done, turn) = chain();
        done.finish(false);
        let e = in_turn(Some(turn), wait()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cancelled);
        let (done, turn) = chain();
        drop(done);
        assert!(in_turn(Some(turn), wait()).await.is_err());
        // Outside a turn nothing waits.
        wait().await.unwrap();
    }
}

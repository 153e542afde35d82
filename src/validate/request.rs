//! What a validation pass asks of a namespace worker: re-copy one `_id` range it found
//! different (DESIGN §2.8). The worker runs it between two batches (`worker::repair`), so the
//! repair and the stream cannot race.

use bson::{Bson, Timestamp};
use tokio::sync::oneshot;

/// Requests a worker handles between batches.
#[derive(Debug)]
pub enum WorkerCommand {
    /// Re-copy one `_id` range for validation repair.
    RepairRange(Box<RepairRequest>),
}

/// A request to re-copy `[lower, upper)` (`None` = MinKey / MaxKey).
pub struct RepairRequest {
    pub lower: Option<Bson>,
    pub upper: Option<Bson>,
    pub reply: oneshot::Sender<Result<RepairDone, String>>,
}

impl std::fmt::Debug for RepairRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No _id values in debug output (they may end up in logs).
        f.debug_struct("RepairRequest")
            .field("bounded_below", &self.lower.is_some())
            .field("bounded_above", &self.upper.is_some())
            .finish_non_exhaustive()
    }
}

/// What a repair wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RepairDone {
    pub upserted: u64,
    pub deleted: u64,
    /// P: where apply was paused.
    pub paused_at: Option<Timestamp>,
}

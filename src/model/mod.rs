//! Domain values without I/O: change events, `_id` keys and source transactions.

pub mod event;
pub mod id_key;
pub mod transaction;

/// Documents per `_id` range read or written at once: copy, reconcile, validation and repair
/// ranges (DESIGN §2.8: ≤ 10,000).
pub const RANGE_MAX_DOCS: usize = 10_000;

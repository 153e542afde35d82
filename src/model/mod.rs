//! Domain values without I/O: change events, `_id` keys and source transactions.

pub mod event;
pub mod id_key;
pub mod transaction;

//! Domain values without I/O: change events and `_id` keys.

pub mod event;
pub mod id_key;

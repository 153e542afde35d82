//! Pure document logic: BSON comparison, query matching, updates, projection, sort, aggregation.
//!
//! Everything here is a pure function over `bson` values: no I/O, no storage.

// `CommandError` (crate::error) is ~160 bytes; the whole crate returns it by value, and
// boxing it here would make this module's API differ from every other module's.
#![allow(clippy::result_large_err)]

pub mod aggregate;
pub mod compare;
pub mod expr;
pub mod matcher;
pub mod path;
pub mod projection;
pub mod sort;

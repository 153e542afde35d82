//! mongo-sim: an in-memory MongoDB 7.0 replica-set primary that speaks the wire protocol.
//!
//! It exists so that mongo-syncd can be tested (and demonstrated) against the real `mongodb`
//! driver without a real `mongod`. It is a test and demo tool, never a production database.

pub mod error;
pub mod query;

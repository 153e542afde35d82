//! mongo-sim: an in-memory MongoDB 7.0 replica-set primary that speaks the wire protocol.
//!
//! It exists so that mongo-syncd can be tested (and demonstrated) against the real `mongodb`
//! driver without a real `mongod`. It is a test and demo tool, never a production database:
//! optional persistence (`--data-dir`, see [`persist`]), no secondaries, no rollback, no sharding.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! let sim = mongo_sim::MongoSim::builder().replica_set("rs0").start().await?;
//! let uri = sim.uri(); // mongodb://127.0.0.1:PORT/?replicaSet=rs0
//! # drop(uri);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod changestream;
pub mod collation;
pub mod commands;
pub mod cursor;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod oplog;
pub mod persist;
pub mod query;
pub mod schema;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod store;
pub mod views;
pub mod wire;

pub use engine::{Engine, SimConfig};
pub use server::{SimBuilder, SimHandle};

/// Entry point of the library API.
pub struct MongoSim;

impl MongoSim {
    pub fn builder() -> SimBuilder {
        SimBuilder::default()
    }
}

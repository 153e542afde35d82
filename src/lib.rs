//! mongo-syncd: keeps a destination MongoDB deployment continuously in sync with a source using
//! change streams. The binary (`src/main.rs`) is a thin two-phase bootstrap around this library;
//! the `demo` subcommand (`src/demo.rs`, two in-process simulators) belongs to the binary, so the
//! daemon's library never links the simulator outside its tests.

pub mod app;
pub mod apply;
pub mod bounded_write;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod error;
pub mod exit;
pub mod fence;
pub mod guard;
pub mod ha;
pub mod identity;
pub mod metadata;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod source;
pub mod status;
pub mod supervisor;
pub mod validate;
pub mod worker;

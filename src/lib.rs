//! mongo-syncd: keeps a destination MongoDB deployment continuously in sync with a source using
//! change streams. The binary (`src/main.rs`) is a thin two-phase bootstrap around this library.

pub mod app;
pub mod apply;
pub mod bounded_write;
pub mod buffer_budget;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod conflict;
pub mod connections;
pub mod demo;
pub mod dest_collection;
pub mod error;
pub mod event;
pub mod exit;
pub mod feed;
pub mod guard;
pub mod http;
pub mod id_key;
pub mod identity;
pub mod metadata;
pub mod metrics;
pub mod notify;
pub mod rlimit;
pub mod shared_stream;
pub mod signal;
pub mod source;
pub mod status;
pub mod supervisor;
pub mod telemetry;
pub mod unique_conflicts;
pub mod validate;
pub mod worker;

//! mongo-syncd: keeps a destination MongoDB deployment continuously in sync with a source using
//! change streams. The binary (`src/main.rs`) is a thin two-phase bootstrap around this library.

pub mod app;
pub mod cli;
pub mod config;
pub mod error;
pub mod exit;
pub mod telemetry;

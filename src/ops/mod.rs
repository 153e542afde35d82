//! How operators see and drive the daemon: the HTTP API, signals, systemd notifications,
//! logs and progress, connection counts, resource limits, the async runtime.

pub mod connections;
pub mod http;
pub mod notify;
pub mod rlimit;
pub mod runtime;
pub mod signal;
pub mod telemetry;

#[cfg(test)]
mod exposition_tests;

//! The single integration-test binary (STYLE convention 15): one link step, shared helpers.

mod config_cli;
mod http_api;
mod operations;
mod replication;
mod support;

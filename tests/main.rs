//! The single integration-test binary (STYLE convention 15): one link step, shared helpers.

mod config_cli;
mod replication;
mod support;
mod validation;

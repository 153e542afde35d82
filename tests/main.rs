//! The single integration-test binary (STYLE convention 15): one link step, shared helpers.

mod apply_semantics;
mod config_cli;
mod conflicts;
mod ddl;
mod faults;
mod http_api;
mod lifecycle;
mod operations;
mod replication;
mod resume;
mod safety;
mod support;
mod validation;

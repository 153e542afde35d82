//! The single integration-test binary (STYLE convention 15): one link step, shared helpers.

mod apply_order;
mod apply_semantics;
mod config_cli;
mod conflicts;
mod ddl;
mod faults;
mod ha;
mod http_api;
mod incarnations;
mod layering;
mod lifecycle;
mod liveness;
mod operations;
mod renames;
mod replication;
mod resume;
mod safety;
mod soak;
mod soak_regressions;
mod source_restarts;
mod stream_scopes;
mod support;
mod transactions;
mod validation;
mod write_lanes;

//! Conformance tests of mongo-sim through the real `mongodb` driver over TCP, plus raw-socket
//! wire-protocol tests. One binary, one module per command family.

mod auth;
mod change_streams;
mod collation;
mod common;
mod crud;
mod ddl;
mod failpoints;
mod field_names;
mod invalidate;
mod lets_and_array_filters;
mod lifecycle;
mod persistence;
mod raw_socket;
mod replace_upserts;
mod retryable;
mod snapshot_reads;
mod stepdown;
mod strict;
mod transactions;
mod views;
mod write_concern;
mod write_stages;

//! Pure document logic: BSON comparison, query matching, updates, projection, sort, aggregation.
//!
//! Everything here is a pure function over `bson` values: no I/O, no storage.

// `CommandError` (crate::error) is ~160 bytes; the whole crate returns it by value, and
// boxing it here would make this module's API differ from every other module's.
#![allow(clippy::result_large_err)]

pub mod aggregate;
pub mod compare;
pub mod expr;
pub mod matcher;
pub mod path;
pub mod projection;
pub mod sort;
pub mod update;

pub use aggregate::{apply_update_pipeline, run_pipeline, PipelineContext};
pub use compare::{canonical_type_rank, compare_values, sort_key_for_array, values_equal, IdKey};
pub use expr::{evaluate, evaluate_optional, Variables};
pub use matcher::Matcher;
pub use path::PathPart;
pub use projection::{AddFields, Projection};
pub use sort::SortSpec;
pub use update::{
    apply_update, apply_update_with_outcome, build_upsert_document, compute_oplog_diff,
    diff_documents, dotted, prepare_for_insert, try_upsert_seed, upsert_seed,
    validate_stored_document, validate_updated_document, UpdateContext, UpdateDescription,
    UpdateOutcome, UpdateSpec,
};

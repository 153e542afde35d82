//! Pure document logic: BSON comparison, query matching, updates, projection, sort, aggregation.
//! TEMPORARY minimal placeholders; replaced by the full engine from branch `simquery`.
pub mod aggregate;
pub mod compare;
pub mod matcher;
pub mod path;
pub mod projection;
pub mod sort;
pub mod update;

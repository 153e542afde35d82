//! Pure document logic: BSON comparison, query matching, updates, projection, sort, aggregation.

use crate::error::CommandResult;
use bson::{Bson, Document};
use std::cmp::Ordering;
#[derive(Debug, Clone)]
pub struct SortSpec {
    keys: Vec<(String, bool)>,
}
impl SortSpec {
    pub fn new(spec: &Document) -> CommandResult<SortSpec> {
        Ok(SortSpec {
            keys: spec
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        !matches!(v, Bson::Int32(-1) | Bson::Int64(-1)) && v.as_f64() != Some(-1.0),
                    )
                })
                .collect(),
        })
    }
    pub fn compare(&self, a: &Document, b: &Document) -> Ordering {
        for (k, asc) in &self.keys {
            let o = super::compare::compare_values(
                a.get(k).unwrap_or(&Bson::Null),
                b.get(k).unwrap_or(&Bson::Null),
            );
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }
}

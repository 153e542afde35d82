use crate::error::CommandResult;
use bson::{Bson, Document};
#[derive(Debug, Clone)]
pub struct Matcher {
    filter: Document,
}
impl Matcher {
    pub fn new(filter: &Document) -> CommandResult<Matcher> {
        Ok(Matcher {
            filter: filter.clone(),
        })
    }
    pub fn matches(&self, doc: &Document) -> bool {
        self.filter.iter().all(|(k, v)| {
            if k.starts_with('$') {
                return true;
            }
            let got = doc.get(k).cloned().unwrap_or(Bson::Null);
            match v {
                Bson::Document(ops) if ops.keys().next().is_some_and(|k| k.starts_with('$')) => {
                    ops.iter().all(|(op, val)| {
                        let o = super::compare::compare_values(&got, val);
                        match op.as_str() {
                            "$eq" => o.is_eq(),
                            "$gt" => o.is_gt(),
                            "$gte" => o.is_ge(),
                            "$lt" => o.is_lt(),
                            "$lte" => o.is_le(),
                            "$ne" => o.is_ne(),
                            _ => true,
                        }
                    })
                }
                _ => super::compare::values_equal(&got, v),
            }
        })
    }
    pub fn id_equality(&self) -> Option<&Bson> {
        if self.filter.len() == 1 {
            match self.filter.get("_id") {
                Some(Bson::Document(_)) | None => None,
                Some(v) => Some(v),
            }
        } else {
            None
        }
    }
}

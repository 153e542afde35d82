use crate::error::CommandResult;
use bson::Document;
#[derive(Debug, Clone)]
pub struct Projection {
    spec: Document,
}
impl Projection {
    pub fn new(spec: &Document) -> CommandResult<Projection> {
        Ok(Projection { spec: spec.clone() })
    }
    pub fn apply(&self, doc: &Document) -> CommandResult<Document> {
        if self.spec.is_empty() {
            return Ok(doc.clone());
        }
        let mut out = Document::new();
        for (k, v) in doc {
            if self
                .spec
                .get(k)
                .map(|b| b.as_i32() == Some(1) || b.as_bool() == Some(true))
                .unwrap_or(k == "_id")
            {
                out.insert(k, v.clone());
            }
        }
        Ok(out)
    }
}

use super::path::PathPart;
use crate::error::{CommandError, CommandResult};
use bson::{Bson, Document};
#[derive(Debug, Clone)]
pub enum UpdateSpec {
    Operators(Document),
    Pipeline(Vec<Document>),
    Replacement(Document),
}
impl UpdateSpec {
    pub fn parse(u: &Bson) -> CommandResult<UpdateSpec> {
        match u {
            Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
                Ok(UpdateSpec::Operators(d.clone()))
            }
            Bson::Document(d) => Ok(UpdateSpec::Replacement(d.clone())),
            Bson::Array(a) => Ok(UpdateSpec::Pipeline(
                a.iter().filter_map(|s| s.as_document().cloned()).collect(),
            )),
            _ => Err(CommandError::failed_to_parse("bad update")),
        }
    }
}
pub struct UpdateContext {
    pub is_upsert_insert: bool,
    pub now: bson::DateTime,
    pub now_ts: bson::Timestamp,
    pub array_filters: Vec<Document>,
}
pub fn apply_update(
    original: &Document,
    spec: &UpdateSpec,
    _ctx: &UpdateContext,
) -> CommandResult<Document> {
    match spec {
        UpdateSpec::Replacement(r) => {
            let mut out = Document::new();
            if let Some(id) = original.get("_id") {
                out.insert("_id", id.clone());
            }
            for (k, v) in r {
                if k != "_id" {
                    out.insert(k, v.clone());
                }
            }
            Ok(out)
        }
        UpdateSpec::Operators(ops) => {
            let mut out = original.clone();
            for (op, args) in ops {
                let args = args
                    .as_document()
                    .ok_or_else(|| CommandError::failed_to_parse("bad args"))?;
                for (k, v) in args {
                    match op.as_str() {
                        "$set" => {
                            out.insert(k, v.clone());
                        }
                        "$unset" => {
                            out.remove(k);
                        }
                        "$inc" => {
                            let cur = out.get(k).and_then(|b| b.as_i32()).unwrap_or(0);
                            out.insert(k, cur + v.as_i32().unwrap_or(0));
                        }
                        _ => {
                            return Err(CommandError::failed_to_parse(format!("unsupported {op}")))
                        }
                    }
                }
            }
            Ok(out)
        }
        UpdateSpec::Pipeline(_) => Err(CommandError::failed_to_parse(
            "pipeline updates not yet supported",
        )),
    }
}
pub fn upsert_seed(filter: &Document) -> Document {
    filter
        .iter()
        .filter(|(k, v)| {
            !k.starts_with('$')
                && !matches!(v, Bson::Document(d) if d.keys().any(|k| k.starts_with('$')))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateDescription {
    pub updated_fields: Vec<(Vec<PathPart>, Bson)>,
    pub removed_fields: Vec<Vec<PathPart>>,
    pub truncated_arrays: Vec<(Vec<PathPart>, u32)>,
}
impl UpdateDescription {
    pub fn is_empty(&self) -> bool {
        self.updated_fields.is_empty()
            && self.removed_fields.is_empty()
            && self.truncated_arrays.is_empty()
    }
}
pub fn dotted(path: &[PathPart]) -> String {
    path.iter()
        .map(|p| match p {
            PathPart::Field(f) => f.clone(),
            PathPart::Index(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}
pub fn diff_documents(old: &Document, new: &Document) -> UpdateDescription {
    let mut d = UpdateDescription::default();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            d.updated_fields
                .push((vec![PathPart::Field(k.clone())], v.clone()));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            d.removed_fields.push(vec![PathPart::Field(k.clone())]);
        }
    }
    d
}
pub fn validate_stored_document(_doc: &Document) -> CommandResult<()> {
    Ok(())
}

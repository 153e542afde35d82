//! Collection validators: `$jsonSchema` (the `required`, `bsonType`, `properties`, `enum`,
//! `minimum`/`maximum`, `additionalProperties` keywords) combined with query operators.

use bson::{doc, Bson, Document};

use crate::{
    error::{codes, CommandError, CommandResult},
    query::{compare::compare_values, matcher::Matcher},
};

#[derive(Debug)]
pub struct Validator {
    schema: Option<Schema>,
    query: Option<Matcher>,
}

#[derive(Debug, Default)]
struct Schema {
    required: Vec<String>,
    bson_types: Vec<String>,
    properties: Vec<(String, Schema)>,
    additional_properties: Option<bool>,
    enumeration: Option<Vec<Bson>>,
    minimum: Option<Bson>,
    maximum: Option<Bson>,
}

impl Validator {
    pub fn new(spec: &Document) -> CommandResult<Validator> {
        let mut query = Document::new();
        let mut schema = None;
        for (k, v) in spec {
            if k == "$jsonSchema" {
                let s = v
                    .as_document()
                    .ok_or_else(|| CommandError::type_mismatch("$jsonSchema must be an object"))?;
                schema = Some(Schema::parse(s)?);
            } else {
                query.insert(k.clone(), v.clone());
            }
        }
        let query = if query.is_empty() {
            None
        } else {
            Some(Matcher::new(&query)?)
        };
        Ok(Validator { schema, query })
    }

    /// Rejects a document with `DocumentValidationFailure` (121), as the server does.
    pub fn check(&self, doc: &Document) -> CommandResult<()> {
        let mut reasons = Vec::new();
        if let Some(s) = &self.schema {
            s.check_doc(doc, "", &mut reasons);
        }
        if let Some(q) = &self.query {
            if !q.matches(doc) {
                reasons.push("document does not match the validator's query".to_string());
            }
        }
        if reasons.is_empty() {
            return Ok(());
        }
        let mut id = Document::new();
        if let Some(v) = doc.get("_id") {
            id.insert("failingDocumentId", v.clone());
        }
        id.insert("details", doc! {"reasons": reasons});
        Err(CommandError::new(
            codes::DOCUMENT_VALIDATION_FAILURE,
            "Document failed validation",
        )
        .with_extra(doc! {"errInfo": id}))
    }
}

fn type_names(v: &Bson) -> Vec<String> {
    match v {
        Bson::String(s) => vec![s.clone()],
        Bson::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

fn bson_type_matches(value: &Bson, name: &str) -> bool {
    match name {
        "double" => matches!(value, Bson::Double(_)),
        "string" => matches!(value, Bson::String(_)),
        "object" => matches!(value, Bson::Document(_)),
        "array" => matches!(value, Bson::Array(_)),
        "binData" => matches!(value, Bson::Binary(_)),
        "objectId" => matches!(value, Bson::ObjectId(_)),
        "bool" => matches!(value, Bson::Boolean(_)),
        "date" => matches!(value, Bson::DateTime(_)),
        "null" => matches!(value, Bson::Null),
        "regex" => matches!(value, Bson::RegularExpression(_)),
        "int" => matches!(value, Bson::Int32(_)),
        "long" => matches!(value, Bson::Int64(_)),
        "decimal" => matches!(value, Bson::Decimal128(_)),
        "timestamp" => matches!(value, Bson::Timestamp(_)),
        "number" => matches!(
            value,
            Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_)
        ),
        _ => false,
    }
}

impl Schema {
    fn parse(s: &Document) -> CommandResult<Schema> {
        let mut out = Schema::default();
        for (k, v) in s {
            match k.as_str() {
                "required" => {
                    out.required = v
                        .as_array()
                        .ok_or_else(|| {
                            CommandError::type_mismatch(
                                "$jsonSchema keyword 'required' must be an array",
                            )
                        })?
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                }
                "bsonType" | "type" => out.bson_types = type_names(v),
                "properties" => {
                    let props = v.as_document().ok_or_else(|| {
                        CommandError::type_mismatch(
                            "$jsonSchema keyword 'properties' must be an object",
                        )
                    })?;
                    for (name, sub) in props {
                        let sub = sub.as_document().ok_or_else(|| {
                            CommandError::type_mismatch("property schema must be an object")
                        })?;
                        out.properties.push((name.clone(), Schema::parse(sub)?));
                    }
                }
                "additionalProperties" => out.additional_properties = v.as_bool(),
                "enum" => out.enumeration = v.as_array().cloned(),
                "minimum" => out.minimum = Some(v.clone()),
                "maximum" => out.maximum = Some(v.clone()),
                "description" | "title" => {}
                other => {
                    return Err(CommandError::new(
                        codes::FAILED_TO_PARSE,
                        format!("Unknown $jsonSchema keyword: {other}"),
                    ))
                }
            }
        }
        Ok(out)
    }

    fn check_value(&self, value: &Bson, path: &str, reasons: &mut Vec<String>) {
        if !self.bson_types.is_empty()
            && !self.bson_types.iter().any(|t| bson_type_matches(value, t))
        {
            reasons.push(format!(
                "field '{path}' must be of type {}",
                self.bson_types.join("|")
            ));
        }
        if let Some(options) = &self.enumeration {
            if !options.iter().any(|o| compare_values(o, value).is_eq()) {
                reasons.push(format!("field '{path}' is not one of the allowed values"));
            }
        }
        if let Some(min) = &self.minimum {
            if crate::query::compare::canonical_type_rank(value)
                == crate::query::compare::canonical_type_rank(min)
                && compare_values(value, min).is_lt()
            {
                reasons.push(format!("field '{path}' is below the minimum"));
            }
        }
        if let Some(max) = &self.maximum {
            if crate::query::compare::canonical_type_rank(value)
                == crate::query::compare::canonical_type_rank(max)
                && compare_values(value, max).is_gt()
            {
                reasons.push(format!("field '{path}' is above the maximum"));
            }
        }
        if let Bson::Document(d) = value {
            self.check_doc(d, path, reasons);
        }
    }

    fn check_doc(&self, doc: &Document, prefix: &str, reasons: &mut Vec<String>) {
        let join = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        for r in &self.required {
            if !doc.contains_key(r) {
                reasons.push(format!("missing required field '{}'", join(r)));
            }
        }
        for (name, sub) in &self.properties {
            if let Some(v) = doc.get(name) {
                sub.check_value(v, &join(name), reasons);
            }
        }
        if self.additional_properties == Some(false) {
            for k in doc.keys() {
                if k != "_id" && !self.properties.iter().any(|(n, _)| n == k) {
                    reasons.push(format!("additional property '{}' is not allowed", join(k)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_and_bson_type_enforced() {
        let v = Validator::new(&doc! {"$jsonSchema": {"bsonType": "object", "required": ["name"], "properties": {"name": {"bsonType": "string"}, "age": {"bsonType": ["int", "long"], "minimum": 0}}}}).unwrap();
        assert!(v.check(&doc! {"_id": 1, "name": "a", "age": 3}).is_ok());
        let e = v.check(&doc! {"_id": 2, "age": 3}).unwrap_err();
        assert_eq!(e.code, 121);
        assert!(v.check(&doc! {"_id": 3, "name": 5}).is_err());
        assert!(v.check(&doc! {"_id": 4, "name": "x", "age": -1}).is_err());
        assert!(v.check(&doc! {"_id": 5, "name": "x", "age": 1.5}).is_err());
    }

    #[test]
    fn unknown_keyword_rejected() {
        assert!(Validator::new(&doc! {"$jsonSchema": {"frobnicate": 1}}).is_err());
    }
}

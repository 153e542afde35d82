use crate::error::{CommandError, CommandResult};
use bson::{doc, Bson, Document};
pub struct PipelineContext {
    pub now: bson::DateTime,
}
pub fn run_pipeline(
    mut input: Vec<Document>,
    stages: &[Document],
    _ctx: &PipelineContext,
) -> CommandResult<Vec<Document>> {
    for st in stages {
        let (name, arg) = st
            .iter()
            .next()
            .ok_or_else(|| CommandError::bad_value("empty stage"))?;
        match name.as_str() {
            "$match" => {
                let m = super::matcher::Matcher::new(arg.as_document().unwrap())?;
                input.retain(|d| m.matches(d));
            }
            "$skip" => {
                let n = arg.as_i64().or(arg.as_i32().map(i64::from)).unwrap_or(0) as usize;
                input = input.into_iter().skip(n).collect();
            }
            "$limit" => {
                let n = arg.as_i64().or(arg.as_i32().map(i64::from)).unwrap_or(0) as usize;
                input.truncate(n);
            }
            "$group" => {
                let n = input.len() as i32;
                input = if n > 0 {
                    vec![doc! {"_id": 1, "n": n}]
                } else {
                    vec![]
                };
            }
            "$count" => {
                let n = input.len() as i32;
                input = if n > 0 {
                    vec![doc! {arg.as_str().unwrap_or("count"): n}]
                } else {
                    vec![]
                };
            }
            other => {
                return Err(CommandError::new(
                    40324,
                    format!("Unrecognized pipeline stage name: '{other}'"),
                ))
            }
        }
    }
    let _ = Bson::Null;
    Ok(input)
}

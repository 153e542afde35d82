//! Views, kept as MongoDB keeps them: one document per view in `<db>.system.views`
//! (`{_id: "<db>.<view>", viewOn: "<coll>", pipeline: [...]}`). Creating, modifying and
//! dropping a view are writes to that collection, so the oplog, the journal of `--data-dir` and
//! change streams (which turn them into `create`/`modify`/`drop` events under
//! `showExpandedEvents`) see them as a real server's do.

use std::sync::Arc;

use bson::{doc, Bson, Document};

use crate::{
    collation::Collation,
    error::{codes, CommandError, CommandResult},
    query::aggregate::{run_pipeline, PipelineContext},
    store::{Catalog, Namespace},
};

/// The collection holding the view definitions of a database.
pub const VIEWS_COLLECTION: &str = "system.views";

/// Longest chain of views on views (`ViewGraph::kMaxViewDepth`).
const MAX_VIEW_DEPTH: usize = 20;

/// Stages a view's pipeline may not contain.
const FORBIDDEN_IN_VIEW: &[&str] = &["$out", "$merge", "$changeStream"];

/// A view's definition as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewDef {
    pub view_on: String,
    pub pipeline: Vec<Bson>,
    /// The view's default collation, every field resolved (`None`: simple). A view does not
    /// inherit its collection's default collation.
    pub collation: Option<Document>,
}

impl ViewDef {
    pub fn from_stored(d: &Document) -> Option<ViewDef> {
        Some(ViewDef {
            view_on: d.get_str("viewOn").ok()?.to_string(),
            pipeline: d.get_array("pipeline").cloned().unwrap_or_default(),
            collation: d.get_document("collation").ok().cloned(),
        })
    }

    pub fn stored(&self, ns: &Namespace) -> Document {
        let mut d = doc! {"_id": ns.to_string()};
        d.extend(self.options());
        d
    }

    /// `options` of the view's `listCollections` entry (and of its change events).
    pub fn options(&self) -> Document {
        let mut d = doc! {"viewOn": self.view_on.clone(), "pipeline": self.pipeline.clone()};
        if let Some(c) = &self.collation {
            d.insert("collation", c.clone());
        }
        d
    }

    /// The view's default collation, parsed.
    pub fn collator(&self) -> CommandResult<Option<Arc<Collation>>> {
        match &self.collation {
            Some(c) => crate::collation::parse(c),
            None => Ok(None),
        }
    }
}

pub fn views_ns(db: &str) -> Namespace {
    Namespace::new(db, VIEWS_COLLECTION)
}

pub fn is_views_collection(ns: &Namespace) -> bool {
    ns.coll == VIEWS_COLLECTION
}

/// The definition of `ns` when it is a view.
pub fn lookup(cat: &Catalog, ns: &Namespace) -> Option<ViewDef> {
    cat.get(&views_ns(&ns.db))?
        .get(&Bson::String(ns.to_string()))
        .and_then(|d| ViewDef::from_stored(d))
}

pub fn is_view(cat: &Catalog, ns: &Namespace) -> bool {
    lookup(cat, ns).is_some()
}

/// Every view of a database, by name.
pub fn list(cat: &Catalog, db: &str) -> Vec<(String, ViewDef)> {
    let Some(c) = cat.get(&views_ns(db)) else {
        return Vec::new();
    };
    let prefix = format!("{db}.");
    c.docs
        .values()
        .filter_map(|d| {
            let name = d.get_str("_id").ok()?.strip_prefix(&prefix)?.to_string();
            Some((name, ViewDef::from_stored(d)?))
        })
        .collect()
}

/// What writes, `listIndexes` and `findAndModify` answer on a view.
pub fn not_a_collection(ns: &Namespace) -> CommandError {
    CommandError::new(
        codes::COMMAND_NOT_SUPPORTED_ON_VIEW,
        format!("Namespace {ns} is a view, not a collection"),
    )
}

/// Checks a view pipeline's shape: an array of one-field stage documents, none of them a
/// writing stage or a change stream.
pub fn check_pipeline(pipeline: &Bson) -> CommandResult<Vec<Bson>> {
    let Bson::Array(stages) = pipeline else {
        return Err(CommandError::type_mismatch(format!(
            "BSON field 'pipeline' is the wrong type '{}', expected type 'array'",
            crate::query::compare::type_name(pipeline)
        )));
    };
    for s in stages {
        let Bson::Document(d) = s else {
            return Err(CommandError::type_mismatch(
                "Each element of the 'pipeline' array must be an object",
            ));
        };
        if let Some(name) = d
            .keys()
            .next()
            .filter(|n| FORBIDDEN_IN_VIEW.contains(&n.as_str()))
        {
            return Err(CommandError::new(
                codes::OPTION_NOT_SUPPORTED_ON_VIEW,
                format!("{name} cannot be used in a view definition"),
            ));
        }
    }
    Ok(stages.clone())
}

/// A view defined on another view must have that view's collation (`ViewGraph`'s check,
/// 167 OptionNotSupportedOnView). `ns` is the view being created or modified.
pub fn check_collation_chain(cat: &Catalog, ns: &Namespace, def: &ViewDef) -> CommandResult<()> {
    let on = Namespace::new(ns.db.clone(), def.view_on.clone());
    if let Some(parent) = lookup(cat, &on) {
        if parent.collation != def.collation {
            return Err(CommandError::new(
                codes::OPTION_NOT_SUPPORTED_ON_VIEW,
                format!("View {ns} has a collation that does not match the collation of view {on}"),
            ));
        }
    }
    // Views already defined on this one (`collMod` may change its collation's chain).
    for (name, child) in list(cat, &ns.db) {
        if child.view_on == ns.coll && child.collation != def.collation {
            return Err(CommandError::new(
                codes::OPTION_NOT_SUPPORTED_ON_VIEW,
                format!(
                    "View {ns} has a collation that does not match the collation of view {}.{name}",
                    ns.db
                ),
            ));
        }
    }
    Ok(())
}

/// The base collection of a view and the pipeline that produces the view from it (the
/// pipelines of a chain of views, innermost first). `None` when `ns` is not a view.
pub fn resolve(cat: &Catalog, ns: &Namespace) -> CommandResult<Option<(Namespace, Vec<Document>)>> {
    let Some(mut def) = lookup(cat, ns) else {
        return Ok(None);
    };
    let mut chain = Vec::new();
    loop {
        chain.push(def.pipeline.clone());
        if chain.len() > MAX_VIEW_DEPTH {
            return Err(CommandError::new(
                codes::VIEW_DEPTH_LIMIT_EXCEEDED,
                format!(
                    "View depth too deep or view cycle detected; maximum depth is {MAX_VIEW_DEPTH}"
                ),
            ));
        }
        let on = Namespace::new(ns.db.clone(), def.view_on.clone());
        match lookup(cat, &on) {
            Some(next) => def = next,
            None => {
                let stages = chain
                    .into_iter()
                    .rev()
                    .flatten()
                    .filter_map(|s| s.as_document().cloned())
                    .collect();
                return Ok(Some((on, stages)));
            }
        }
    }
}

/// The documents of a view: its base collection (empty when missing) through its pipeline.
pub fn documents(
    cat: &Catalog,
    base: &Namespace,
    pipeline: &[Document],
    ctx: &PipelineContext,
) -> CommandResult<Vec<Document>> {
    let input = cat
        .get(base)
        .map(|c| c.docs.values().map(|d| (**d).clone()).collect())
        .unwrap_or_default();
    run_pipeline(input, pipeline, ctx)
}

//! Conflict policies (DESIGN §2.6): what to do when the destination document changed
//! independently. This module is pure: it turns one change event into a conditional write
//! and builds the filters; `apply` executes them.
//!
//! - `source-wins`: the source's write is applied; nothing is detected or counted.
//! - `destination-wins`: an update, replace or delete applies only if the destination document
//!   still equals the source's pre-image (`$expr: {$eq: ["$$ROOT", {$literal: pre}]}`); an insert
//!   meeting an existing `_id` is skipped; a document missing on the destination is never
//!   recreated.
//! - `newest-wins` / `version-wins`: the full source document replaces the destination one only
//!   if the destination's `field` is not greater (`$lte`, or missing); otherwise the write is
//!   skipped. Equal values apply, so replays stay idempotent. Deletes always apply.
//! - `journal`: destination-wins, with every skipped write journaled.

use bson::{rawdoc, RawBson, RawDocument, RawDocumentBuf};

use crate::{
    config::ConflictPolicy,
    metrics::ConflictPolicyLabel,
    model::event::{ChangeEvent, OpKind},
};

/// The conflict settings of one namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictSettings {
    pub policy: ConflictPolicy,
    /// `conflict.field` for newest-wins / version-wins (a dotted path).
    pub field: Option<String>,
    /// `conflict.journal`: record non-applied conflicts in `<metadata>.conflicts`.
    pub journal: bool,
}

impl Default for ConflictSettings {
    fn default() -> Self {
        ConflictSettings {
            policy: ConflictPolicy::SourceWins,
            field: None,
            journal: true,
        }
    }
}

impl ConflictSettings {
    pub fn detects_conflicts(&self) -> bool {
        self.policy != ConflictPolicy::SourceWins
    }

    /// Whether skipped writes are journaled.
    pub fn journals(&self) -> bool {
        self.policy == ConflictPolicy::Journal || (self.journal && self.detects_conflicts())
    }

    /// Pre-images (and post-images) of updates, replaces and deletes are needed.
    pub fn needs_pre_images(&self) -> bool {
        self.policy.needs_pre_images()
    }

    /// The full source document of every update is needed.
    pub fn needs_full_documents(&self) -> bool {
        self.policy != ConflictPolicy::SourceWins
    }

    pub fn label(&self) -> ConflictPolicyLabel {
        match self.policy {
            ConflictPolicy::SourceWins => ConflictPolicyLabel::SourceWins,
            ConflictPolicy::DestinationWins => ConflictPolicyLabel::DestinationWins,
            ConflictPolicy::NewestWins => ConflictPolicyLabel::NewestWins,
            ConflictPolicy::VersionWins => ConflictPolicyLabel::VersionWins,
            ConflictPolicy::Journal => ConflictPolicyLabel::Journal,
        }
    }
}

/// A write whose application depends on the destination's current state.
#[derive(Debug, Clone, PartialEq)]
pub enum Conditional {
    /// Insert; an existing `_id` on the destination is a conflict (destination-wins).
    InsertIfAbsent(RawDocumentBuf),
    /// Replace `pre` by `post` only if the destination still equals `pre` (destination-wins).
    ReplaceIfUnchanged {
        pre: RawDocumentBuf,
        post: RawDocumentBuf,
    },
    /// Delete only if the destination still equals `pre` (destination-wins).
    DeleteIfUnchanged { pre: RawDocumentBuf },
    /// Replace-upsert `doc` only if the destination's field is not newer (newest/version-wins).
    ReplaceIfNotNewer { doc: RawDocumentBuf },
    /// Delete unconditionally (newest/version-wins).
    Delete,
    /// The event lacks the image the policy needs: a conflict with outcome `unknown`.
    Unknown,
    /// Nothing to do (an `updateLookup` that found the document already deleted).
    Skip,
}

/// The conditional write one data event turns into under `settings`.
pub fn plan(event: &ChangeEvent, settings: &ConflictSettings) -> Conditional {
    let owned = |d: &RawDocument| d.to_owned();
    match settings.policy {
        ConflictPolicy::SourceWins => Conditional::Skip,
        ConflictPolicy::DestinationWins | ConflictPolicy::Journal => match event.kind {
            OpKind::Insert => match event.full_document() {
                Some(d) => Conditional::InsertIfAbsent(owned(d)),
                None => Conditional::Unknown,
            },
            OpKind::Update | OpKind::Replace => match (event.pre_image(), event.full_document()) {
                (Some(pre), Some(post)) => Conditional::ReplaceIfUnchanged {
                    pre: owned(pre),
                    post: owned(post),
                },
                _ => Conditional::Unknown,
            },
            OpKind::Delete => match event.pre_image() {
                Some(pre) => Conditional::DeleteIfUnchanged { pre: owned(pre) },
                None => Conditional::Unknown,
            },
            _ => Conditional::Skip,
        },
        ConflictPolicy::NewestWins | ConflictPolicy::VersionWins => match event.kind {
            OpKind::Insert | OpKind::Update | OpKind::Replace => match event.full_document() {
                Some(d) => Conditional::ReplaceIfNotNewer { doc: owned(d) },
                None if event.full_document_is_null() => Conditional::Skip,
                None => Conditional::Unknown,
            },
            OpKind::Delete => Conditional::Delete,
            _ => Conditional::Skip,
        },
    }
}

/// Reads a dotted path in a raw document (no array traversal: the field is a scalar).
pub fn value_at(doc: &RawDocument, path: &str) -> Option<RawBson> {
    let mut current = doc;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let value = current.get(part).ok()??;
        if parts.peek().is_none() {
            return Some(RawBson::from(value));
        }
        current = value.as_document()?;
    }
    None
}

/// `{_id, $expr: {$eq: ["$$ROOT", {$literal: pre}]}}`: matches only a destination document
/// byte-for-byte equal (fields, order, types) to the source's pre-image. `$literal` keeps values
/// like `"$x"` from being read as field paths.
pub fn unchanged_filter(id: &RawBson, pre: &RawDocument) -> RawDocumentBuf {
    rawdoc! {
        "_id": id.clone(),
        "$expr": {"$eq": ["$$ROOT", {"$literal": pre.to_owned()}]},
    }
}

/// `{_id, $or: [{field: {$lte: v}}, {field: {$exists: false}}]}` (or, when the source document
/// has no such field, `{_id, field: {$exists: false}}`). With `upsert: true`, a duplicate key on
/// `_id_` then means the destination is newer (or its field has another type).
pub fn not_newer_filter(
    id: &RawBson,
    field: &str,
    source_value: Option<RawBson>,
) -> Result<RawDocumentBuf, bson::error::Error> {
    let key = <&bson::raw::CStr>::try_from(field)?;
    let mut missing = RawDocumentBuf::new();
    missing.append(key, rawdoc! {"$exists": false});
    let mut filter = rawdoc! {"_id": id.clone()};
    match source_value {
        Some(v) => {
            let mut lte = RawDocumentBuf::new();
            lte.append(key, rawdoc! {"$lte": v});
            let mut either = bson::RawArrayBuf::new();
            either.push(lte);
            either.push(missing);
            filter.append(bson::cstr!("$or"), either);
        }
        None => {
            filter.append(key, rawdoc! {"$exists": false});
        }
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::Timestamp;

    fn event(op: &str, extra: RawDocumentBuf) -> ChangeEvent {
        let mut d = rawdoc! {"_id": {"_data": "82000000640000000101"}, "operationType": op, "clusterTime": Timestamp { time: 100, increment: 1 }, "documentKey": {"_id": 1}};
        for item in extra.iter() {
            let (k, v) = item.unwrap();
            d.append(k, RawBson::from(v));
        }
        ChangeEvent::parse(d).unwrap()
    }

    fn settings(policy: ConflictPolicy) -> ConflictSettings {
        ConflictSettings {
            policy,
            field: Some("updated_at".into()),
            journal: false,
        }
    }

    #[test]
    fn destination_wins_needs_images() {
        let s = settings(ConflictPolicy::DestinationWins);
        let upd = event(
            "update",
            rawdoc! {"fullDocument": {"_id": 1, "v": 2}, "fullDocumentBeforeChange": {"_id": 1, "v": 1}},
        );
        assert!(matches!(
            plan(&upd, &s),
            Conditional::ReplaceIfUnchanged { .. }
        ));
        let no_pre = event(
            "update",
            rawdoc! {"fullDocument": {"_id": 1, "v": 2}, "fullDocumentBeforeChange": null},
        );
        assert_eq!(plan(&no_pre, &s), Conditional::Unknown);
        let del = event("delete", rawdoc! {"fullDocumentBeforeChange": {"_id": 1}});
        assert!(matches!(
            plan(&del, &s),
            Conditional::DeleteIfUnchanged { .. }
        ));
        let ins = event("insert", rawdoc! {"fullDocument": {"_id": 1}});
        assert!(matches!(plan(&ins, &s), Conditional::InsertIfAbsent(_)));
    }

    #[test]
    fn newest_wins_replaces_or_skips() {
        let s = settings(ConflictPolicy::NewestWins);
        let upd = event("update", rawdoc! {"fullDocument": {"_id": 1, "v": 2}});
        assert!(matches!(
            plan(&upd, &s),
            Conditional::ReplaceIfNotNewer { .. }
        ));
        let gone = event("update", rawdoc! {"fullDocument": null});
        assert_eq!(plan(&gone, &s), Conditional::Skip);
        assert_eq!(plan(&event("delete", rawdoc! {}), &s), Conditional::Delete);
    }

    #[test]
    fn journaling_follows_policy_and_flag() {
        assert!(settings(ConflictPolicy::Journal).journals());
        assert!(!settings(ConflictPolicy::DestinationWins).journals());
        let mut s = settings(ConflictPolicy::NewestWins);
        s.journal = true;
        assert!(s.journals());
        let mut s = settings(ConflictPolicy::SourceWins);
        s.journal = true;
        assert!(!s.journals(), "source-wins detects no conflicts");
    }

    #[test]
    fn filters_have_the_documented_shape() {
        let f = unchanged_filter(&RawBson::Int32(1), &rawdoc! {"_id": 1, "x": "$notapath"});
        let f: bson::Document = f.try_into().unwrap();
        assert_eq!(
            f,
            bson::doc! {"_id": 1, "$expr": {"$eq": ["$$ROOT", {"$literal": {"_id": 1, "x": "$notapath"}}]}}
        );
        let f: bson::Document =
            not_newer_filter(&RawBson::Int32(1), "meta.v", Some(RawBson::Int64(5)))
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            f,
            bson::doc! {"_id": 1, "$or": [{"meta.v": {"$lte": 5i64}}, {"meta.v": {"$exists": false}}]}
        );
        let f: bson::Document = not_newer_filter(&RawBson::Int32(1), "v", None)
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(f, bson::doc! {"_id": 1, "v": {"$exists": false}});
    }

    #[test]
    fn value_at_reads_dotted_paths() {
        let d = rawdoc! {"a": {"b": 3}, "c": 1};
        assert_eq!(value_at(&d, "a.b"), Some(RawBson::Int32(3)));
        assert_eq!(value_at(&d, "c"), Some(RawBson::Int32(1)));
        assert_eq!(value_at(&d, "a.x"), None);
        assert_eq!(value_at(&d, "c.x"), None);
    }
}

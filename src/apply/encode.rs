//! Statements and bulk commands written straight into one buffer each, sized up front.
//!
//! A drain sends one statement per event: built with nested `RawDocumentBuf`s, each statement
//! cost four allocations and its bytes were copied three times (into its document, into the
//! command's array, into the command) with the buffers regrown along the way, a tenth of the
//! daemon's CPU in a drain. The bytes are the same as `RawDocumentBuf::append` writes (the
//! tests compare them).

use bson::{raw::CStr, spec::ElementType, RawBsonRef, RawDocument, RawDocumentBuf};

/// Starts an embedded or top-level document; returns where its length goes.
fn open(buf: &mut Vec<u8>) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    start
}

/// Ends the document `open` started at `start`.
fn close(buf: &mut Vec<u8>, start: usize) {
    buf.push(0);
    let len = (buf.len() - start) as i32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// An array index as its key: decimal digits.
fn decimal(buf: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0_u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

fn key(buf: &mut Vec<u8>, kind: ElementType, name: &[u8]) {
    buf.push(kind as u8);
    buf.extend_from_slice(name);
    buf.push(0);
}

/// One element; common `_id` types are written directly, others through a document.
fn element(buf: &mut Vec<u8>, name: &CStr, value: RawBsonRef<'_>) {
    match value {
        RawBsonRef::Int32(n) => {
            key(buf, ElementType::Int32, name.as_str().as_bytes());
            buf.extend_from_slice(&n.to_le_bytes());
        }
        RawBsonRef::Int64(n) => {
            key(buf, ElementType::Int64, name.as_str().as_bytes());
            buf.extend_from_slice(&n.to_le_bytes());
        }
        RawBsonRef::ObjectId(oid) => {
            key(buf, ElementType::ObjectId, name.as_str().as_bytes());
            buf.extend_from_slice(&oid.bytes());
        }
        RawBsonRef::String(s) => {
            key(buf, ElementType::String, name.as_str().as_bytes());
            buf.extend_from_slice(&(s.len() as i32 + 1).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
            buf.push(0);
        }
        RawBsonRef::Document(d) => embedded(buf, ElementType::EmbeddedDocument, name, d),
        other => {
            let mut one = RawDocumentBuf::new();
            one.append(name, other);
            let bytes = one.as_bytes();
            buf.extend_from_slice(&bytes[4..bytes.len() - 1]);
        }
    }
}

fn embedded(buf: &mut Vec<u8>, kind: ElementType, name: &CStr, doc: &RawDocument) {
    key(buf, kind, name.as_str().as_bytes());
    buf.extend_from_slice(doc.as_bytes());
}

fn finish(buf: Vec<u8>) -> RawDocumentBuf {
    RawDocumentBuf::from_bytes(buf).expect("the encoder closes every document it opens")
}

/// `{q: {_id: id}, u: {$set: set, $unset: {k: ""...}}}`, each operator only when not empty.
/// `unset` names are checked for NUL bytes by the caller.
pub(super) fn delta_statement(
    id: RawBsonRef<'_>,
    set: &RawDocument,
    unset: &[String],
) -> RawDocumentBuf {
    let set_len = if set.is_empty() {
        0
    } else {
        set.as_bytes().len()
    };
    let unset_len: usize = unset.iter().map(|k| k.len() + 7).sum();
    let mut buf = Vec::with_capacity(64 + set_len + unset_len);
    let statement = open(&mut buf);
    key(&mut buf, ElementType::EmbeddedDocument, b"q");
    let q = open(&mut buf);
    element(&mut buf, bson::cstr!("_id"), id);
    close(&mut buf, q);
    key(&mut buf, ElementType::EmbeddedDocument, b"u");
    let u = open(&mut buf);
    if !set.is_empty() {
        embedded(
            &mut buf,
            ElementType::EmbeddedDocument,
            bson::cstr!("$set"),
            set,
        );
    }
    if !unset.is_empty() {
        key(&mut buf, ElementType::EmbeddedDocument, b"$unset");
        let fields = open(&mut buf);
        for name in unset {
            key(&mut buf, ElementType::String, name.as_bytes());
            buf.extend_from_slice(&1_i32.to_le_bytes());
            buf.push(0);
        }
        close(&mut buf, fields);
    }
    close(&mut buf, u);
    close(&mut buf, statement);
    finish(buf)
}

/// `{<command>: collection, <field>: [statements...]}`: the start of a bulk command, with room
/// for the options the caller appends.
pub(super) fn bulk_command(
    command: &CStr,
    collection: &str,
    field: &CStr,
    statements: &[RawDocumentBuf],
) -> RawDocumentBuf {
    let bytes: usize = statements.iter().map(|s| s.as_bytes().len() + 8).sum();
    let mut buf = Vec::with_capacity(bytes + collection.len() + 160);
    let cmd = open(&mut buf);
    element(&mut buf, command, RawBsonRef::String(collection));
    key(&mut buf, ElementType::Array, field.as_str().as_bytes());
    let array = open(&mut buf);
    for (i, statement) in statements.iter().enumerate() {
        buf.push(ElementType::EmbeddedDocument as u8);
        decimal(&mut buf, i);
        buf.push(0);
        buf.extend_from_slice(statement.as_bytes());
    }
    close(&mut buf, array);
    close(&mut buf, cmd);
    finish(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{oid::ObjectId, rawdoc, RawArrayBuf, RawBson};

    /// What the encoder replaces: the same documents built by appending.
    fn appended_statement(
        id: RawBsonRef<'_>,
        set: &RawDocument,
        unset: &[String],
    ) -> RawDocumentBuf {
        let mut u = RawDocumentBuf::new();
        if !set.is_empty() {
            u.append(bson::cstr!("$set"), set);
        }
        if !unset.is_empty() {
            let mut d = RawDocumentBuf::new();
            for k in unset {
                d.append(<&CStr>::try_from(k.as_str()).unwrap(), "");
            }
            u.append(bson::cstr!("$unset"), d);
        }
        let mut q = RawDocumentBuf::new();
        q.append(bson::cstr!("_id"), id);
        rawdoc! {"q": q, "u": u}
    }

    #[test]
    fn statements_are_the_bytes_appending_writes_for_every_kind_of_id() {
        let set = rawdoc! {"visits": 7_i64, "a.b": {"c": [1, "x"]}, "s": "é"};
        let empty = RawDocumentBuf::new();
        let unset = ["gone".to_owned(), "a.0.b".to_owned()];
        let ids: Vec<RawBson> = vec![
            RawBson::Int32(-5),
            RawBson::Int64(i64::MAX),
            RawBson::ObjectId(ObjectId::new()),
            RawBson::String("ünïcode key".into()),
            RawBson::String(String::new()),
            RawBson::Double(2.5),
            RawBson::Document(rawdoc! {"k": 1, "n": {"deep": true}}),
            RawBson::Array(RawArrayBuf::from_iter([RawBson::Int32(1), RawBson::Null])),
            RawBson::Boolean(true),
            RawBson::Null,
        ];
        for id in &ids {
            for (set, unset) in [(&set, &unset[..]), (&set, &[][..]), (&empty, &unset[..])] {
                assert_eq!(
                    delta_statement(id.as_raw_bson_ref(), set, unset).as_bytes(),
                    appended_statement(id.as_raw_bson_ref(), set, unset).as_bytes(),
                    "id {id:?}"
                );
            }
        }
    }

    #[test]
    fn bulk_commands_are_the_bytes_appending_writes() {
        let statements: Vec<RawDocumentBuf> = (0..12)
            .map(|i| rawdoc! {"q": {"_id": i}, "u": {"$set": {"v": i}}})
            .collect();
        for n in [0, 1, 11, 12] {
            let mut arr = RawArrayBuf::new();
            for s in &statements[..n] {
                arr.push(s.clone());
            }
            let mut expected = RawDocumentBuf::new();
            expected.append(bson::cstr!("update"), "coll");
            expected.append(bson::cstr!("updates"), arr);
            let built = bulk_command(
                bson::cstr!("update"),
                "coll",
                bson::cstr!("updates"),
                &statements[..n],
            );
            assert_eq!(built.as_bytes(), expected.as_bytes(), "{n} statements");
        }
    }
}

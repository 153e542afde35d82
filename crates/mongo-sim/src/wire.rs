//! The MongoDB wire protocol: message header, OP_MSG (both directions), the legacy OP_QUERY
//! handshake and its OP_REPLY answer. Decoding never panics: every malformed input is an error.

use bson::Document;

pub const OP_REPLY: i32 = 1;
pub const OP_QUERY: i32 = 2004;
pub const OP_COMPRESSED: i32 = 2012;
pub const OP_MSG: i32 = 2013;

pub const HEADER_LEN: usize = 16;
/// `maxMessageSizeBytes` advertised in `hello`; larger messages close the connection.
pub const MAX_MESSAGE_SIZE: usize = 48_000_000;

pub const FLAG_CHECKSUM_PRESENT: u32 = 1;
pub const FLAG_MORE_TO_COME: u32 = 1 << 1;
pub const FLAG_EXHAUST_ALLOWED: u32 = 1 << 16;
/// Bits 0-15 are "required": a receiver must reject unknown ones.
const REQUIRED_FLAGS_MASK: u32 = 0xffff;
const KNOWN_REQUIRED_FLAGS: u32 = FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    pub length: i32,
    pub request_id: i32,
    pub response_to: i32,
    pub op_code: i32,
}

impl MsgHeader {
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> MsgHeader {
        let int =
            |i: usize| i32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        MsgHeader {
            length: int(0),
            request_id: int(4),
            response_to: int(8),
            op_code: int(12),
        }
    }

    /// Checks the announced length before anything is allocated for the body.
    pub fn body_len(&self) -> Result<usize, WireError> {
        let len = self.length;
        if len <= HEADER_LEN as i32 || len as usize > MAX_MESSAGE_SIZE {
            return Err(WireError::BadLength(len));
        }
        Ok(len as usize - HEADER_LEN)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("message length {0} is out of bounds (16 < length <= {MAX_MESSAGE_SIZE})")]
    BadLength(i32),
    #[error("unsupported opcode {0}")]
    UnsupportedOpCode(i32),
    #[error("message truncated: {0}")]
    Truncated(&'static str),
    #[error("unknown required OP_MSG flag bits {0:#x}")]
    IllegalFlags(u32),
    #[error("OP_MSG checksum mismatch")]
    ChecksumMismatch,
    #[error("OP_MSG must have exactly one body section, found {0}")]
    BodyCount(usize),
    #[error("unknown OP_MSG section kind {0}")]
    UnknownSectionKind(u8),
    #[error("invalid BSON document: {0}")]
    InvalidBson(String),
    #[error("duplicate document sequence identifier {0:?}")]
    DuplicateSequence(String),
    #[error("invalid cstring")]
    InvalidCString,
}

/// A decoded OP_MSG request.
#[derive(Debug, Clone, PartialEq)]
pub struct OpMsg {
    pub flags: u32,
    pub body: Document,
    /// Kind-1 sections: identifier and documents, in arrival order.
    pub sequences: Vec<(String, Vec<Document>)>,
    /// The `updates` of an `update` command (from the body or a kind-1 section; it replaces
    /// any `updates` of the body), kept as received: see [`RawBatch`].
    pub raw_updates: Option<RawBatch>,
}

impl OpMsg {
    pub fn more_to_come(&self) -> bool {
        self.flags & FLAG_MORE_TO_COME != 0
    }

    /// The command as the server sees it: kind-1 sequences become array fields of the body.
    pub fn into_command(self) -> Document {
        let (mut body, raw_updates) = self.into_parts();
        if let Some(batch) = raw_updates {
            body.insert("updates", batch.to_array());
        }
        body
    }

    /// [`OpMsg::into_command`] without `update`'s statements when they were kept raw (the
    /// server executes them from the [`RawBatch`]).
    pub fn into_parts(self) -> (Document, Option<RawBatch>) {
        let mut body = self.body;
        for (identifier, docs) in self.sequences {
            body.insert(
                identifier,
                bson::Bson::Array(docs.into_iter().map(bson::Bson::Document).collect()),
            );
        }
        if self.raw_updates.is_some() {
            body.remove("updates");
        }
        (body, self.raw_updates)
    }
}

/// The statements of an `update` command as they came on the wire (validated BSON documents,
/// element by element as [`Document`] conversion checks them), so that the simulator need not
/// build a [`Document`] for every statement and its filter: the common replacement by `_id`
/// reads them in place and converts only the replacement. The others are converted when they
/// execute ([`RawBatch::statement`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RawBatch {
    bytes: Vec<u8>,
    docs: Vec<std::ops::Range<usize>>,
    /// Per statement, its [`ReplaceById`] when it has that shape (converted while the
    /// message is checked, instead of checking it and converting it later). Boxed: a batch's
    /// vector of them inline would be a ~200 KB allocation per command, moved as it grows
    /// and fresh memory for the allocator to fault in.
    replacements: Vec<Option<Box<ReplaceById>>>,
}

/// A statement of the shape copy and apply send, `{q: {_id: X}, u: {...}, upsert, multi}`
/// (only these fields, each once, `u` a document whose first field is not `$`-prefixed,
/// `multi` not `true`), as its `_id`, its replacement and its `upsert`, converted when the
/// message is decoded. Whether the replacement by `_id` applies (the kind of `_id`, a
/// replacement that changes it) is the executor's decision; the statement's bytes stay in the
/// batch for the general path.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaceById {
    pub id: bson::Bson,
    pub replacement: Document,
    pub upsert: bool,
}

/// Checks statement `stmt` of an `update` batch as [`validate_raw_document`] does, converting
/// it to a [`ReplaceById`] when it has that shape: the conversion goes over every element (the
/// statement's, the filter's, the replacement's), which is the check.
fn check_statement(stmt: &bson::RawDocument) -> bson::error::Result<Option<Box<ReplaceById>>> {
    match replace_by_id(stmt) {
        Ok(Some(r)) => Ok(Some(Box::new(r))),
        // Another shape, or an error: the whole statement is checked element by element, so
        // the answer is exactly the check's.
        _ => validate_raw_document(stmt).map(|()| None),
    }
}

/// [`ReplaceById`] of `stmt` (`None`: another shape).
fn replace_by_id(stmt: &bson::RawDocument) -> bson::error::Result<Option<ReplaceById>> {
    use bson::RawBsonRef;
    let (mut q, mut u, mut upsert, mut multi) = (None, None, None, None);
    for element in stmt {
        let (key, value) = element?;
        let slot = match key.as_str() {
            "q" => &mut q,
            "u" => &mut u,
            "upsert" => &mut upsert,
            "multi" => &mut multi,
            _ => return Ok(None),
        };
        if slot.replace(value).is_some() {
            return Ok(None); // a repeated field: the general path resolves it
        }
    }
    let (Some(RawBsonRef::Document(q)), Some(RawBsonRef::Document(r))) = (q, u) else {
        return Ok(None);
    };
    // `multi` and `upsert` as `get_bool(…).unwrap_or(false)` reads them.
    if matches!(multi, Some(RawBsonRef::Boolean(true))) {
        return Ok(None);
    }
    let upsert = matches!(upsert, Some(RawBsonRef::Boolean(true)));
    let mut filter = q.into_iter();
    let (Some((key, id)), None) = (filter.next().transpose()?, filter.next().transpose()?) else {
        return Ok(None);
    };
    let replacement = match r.into_iter().next().transpose()? {
        Some((k, _)) => !k.as_str().starts_with('$'),
        None => false,
    };
    if key.as_str() != "_id" || !replacement {
        return Ok(None);
    }
    Ok(Some(ReplaceById {
        id: raw_to_bson(id)?,
        replacement: raw_to_document(r)?,
        upsert,
    }))
}

impl RawBatch {
    /// The documents of `array` when every element is one (`None` otherwise: a batch with a
    /// non-document statement goes the general way, which reports it).
    fn from_array(array: &bson::RawArray) -> bson::error::Result<Option<RawBatch>> {
        let base = array.as_bytes().as_ptr() as usize;
        let mut docs = Vec::new();
        let mut replacements = Vec::new();
        for value in array {
            let bson::RawBsonRef::Document(d) = value? else {
                return Ok(None);
            };
            if docs.is_empty() {
                // As many statements as the first one's size suggests (statements of a batch
                // are alike), within the server's maxWriteBatchSize: the vectors would
                // otherwise grow ten times for 1,000 statements.
                let n = (array.as_bytes().len() / (d.as_bytes().len() + 3)).clamp(1, 100_000);
                docs.reserve(n);
                replacements.reserve(n);
            }
            replacements.push(check_statement(d)?);
            let start = d.as_bytes().as_ptr() as usize - base;
            docs.push(start..start + d.as_bytes().len());
        }
        Ok(Some(RawBatch {
            bytes: array.as_bytes().to_vec(),
            docs,
            replacements,
        }))
    }

    /// Whether statement `i` is a [`ReplaceById`] (until [`RawBatch::take_replacements`]).
    pub fn is_replace_by_id(&self, i: usize) -> bool {
        self.replacements.get(i).is_some_and(Option::is_some)
    }

    /// The [`ReplaceById`] of every statement, moved out of the batch (the statements' bytes
    /// stay).
    pub fn take_replacements(&mut self) -> Vec<Option<Box<ReplaceById>>> {
        let mut taken = std::mem::take(&mut self.replacements);
        taken.resize(self.docs.len(), None);
        taken
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Statement `i`.
    pub fn get(&self, i: usize) -> &bson::RawDocument {
        bson::RawDocument::from_bytes(&self.bytes[self.docs[i].clone()])
            .expect("validated when decoded")
    }

    /// Statement `i` as a document.
    pub fn statement(&self, i: usize) -> Document {
        raw_to_document(self.get(i)).expect("validated when decoded")
    }

    /// The statements as the `updates` array of the command.
    pub fn to_array(&self) -> bson::Bson {
        bson::Bson::Array(
            (0..self.len())
                .map(|i| bson::Bson::Document(self.statement(i)))
                .collect(),
        )
    }
}

/// A decoded legacy OP_QUERY (only the handshake uses it).
#[derive(Debug, Clone, PartialEq)]
pub struct OpQuery {
    pub flags: i32,
    pub full_collection_name: String,
    pub number_to_skip: i32,
    pub number_to_return: i32,
    pub query: Document,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Msg(OpMsg),
    Query(OpQuery),
}

/// Decodes the body (everything after the 16-byte header) of a request.
pub fn decode_request(header: &MsgHeader, body: &[u8]) -> Result<Request, WireError> {
    match header.op_code {
        OP_MSG => decode_op_msg(header, body).map(Request::Msg),
        OP_QUERY => decode_op_query(body).map(Request::Query),
        other => Err(WireError::UnsupportedOpCode(other)),
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, WireError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(WireError::Truncated("integer"))
}

fn read_i32(bytes: &[u8], at: usize) -> Result<i32, WireError> {
    read_u32(bytes, at).map(|v| v as i32)
}

/// The bytes of the BSON document at `at` (its announced length checked), and the position
/// after it.
fn document_bytes(bytes: &[u8], at: usize) -> Result<(&[u8], usize), WireError> {
    let len = read_i32(bytes, at)?;
    if len < 5 {
        return Err(WireError::InvalidBson(format!("document length {len}")));
    }
    let end = at
        .checked_add(len as usize)
        .filter(|end| *end <= bytes.len())
        .ok_or(WireError::Truncated("document"))?;
    Ok((&bytes[at..end], end))
}

/// `Document::from_reader`'s answer for bytes a faster conversion found invalid: the same
/// error (and message) as before that conversion existed.
fn reference_decode(slice: &[u8]) -> Result<Document, WireError> {
    Document::from_reader(slice).map_err(|e| WireError::InvalidBson(e.to_string()))
}

/// Reads one BSON document at `at`, returning it and the position after it.
fn read_document(bytes: &[u8], at: usize) -> Result<(Document, usize), WireError> {
    let (slice, end) = document_bytes(bytes, at)?;
    // The direct conversion gives the same documents as `Document::from_reader` without its
    // copies; on any error the answer (and its message) is `from_reader`'s.
    let doc = match bson::RawDocument::from_bytes(slice).and_then(raw_to_document) {
        Ok(doc) => doc,
        Err(_) => reference_decode(slice)?,
    };
    Ok((doc, end))
}

/// Reads the body section at `at`; the `updates` array of an `update` command stays raw.
fn read_body(bytes: &[u8], at: usize) -> Result<(Document, Option<RawBatch>, usize), WireError> {
    let (slice, end) = document_bytes(bytes, at)?;
    match bson::RawDocument::from_bytes(slice).and_then(body_to_document) {
        Ok((doc, batch)) => Ok((doc, batch, end)),
        Err(_) => Ok((reference_decode(slice)?, None, end)),
    }
}

/// [`raw_to_document`] of a command body, keeping an `update`'s `updates` raw when it is an
/// array of documents. Duplicate fields resolve as in a [`Document`]: the last value wins.
fn body_to_document(raw: &bson::RawDocument) -> bson::error::Result<(Document, Option<RawBatch>)> {
    let mut out = Document::new();
    let mut batch = None;
    let mut is_update = None;
    for element in raw {
        let (key, value) = element?;
        let key = key.as_str();
        let is_update = *is_update.get_or_insert(key == "update");
        if is_update && key == "updates" {
            if let bson::RawBsonRef::Array(a) = value {
                if let Some(b) = RawBatch::from_array(a)? {
                    out.remove("updates");
                    batch = Some(b);
                    continue;
                }
            }
            batch = None;
        }
        out.insert(key, raw_to_bson(value)?);
    }
    Ok((out, batch))
}

/// Checks a raw document the way converting it to a [`Document`] does (every element,
/// nested documents, arrays and code scopes included), without building anything.
fn validate_raw_document(raw: &bson::RawDocument) -> bson::error::Result<()> {
    for element in raw {
        validate_raw_value(element?.1)?;
    }
    Ok(())
}

fn validate_raw_value(value: bson::RawBsonRef<'_>) -> bson::error::Result<()> {
    match value {
        bson::RawBsonRef::Document(d) => validate_raw_document(d),
        bson::RawBsonRef::Array(a) => a.into_iter().try_for_each(|v| validate_raw_value(v?)),
        bson::RawBsonRef::JavaScriptCodeWithScope(c) => validate_raw_document(c.scope),
        _ => Ok(()),
    }
}

/// A raw document as a [`Document`]: what `Document::try_from(&RawDocument)` does (the same
/// element iterator, so the same validation), without copying every nested document and array
/// into a buffer of its own first (the `bson` crate converts through `RawBson`, an owned copy,
/// at each level: three copies of a statement of an `update` batch).
pub(crate) fn raw_to_document(raw: &bson::RawDocument) -> bson::error::Result<Document> {
    let mut out = Document::new();
    for element in raw {
        let (key, value) = element?;
        out.insert(key.as_str(), raw_to_bson(value)?);
    }
    Ok(out)
}

pub(crate) fn raw_to_bson(value: bson::RawBsonRef<'_>) -> bson::error::Result<bson::Bson> {
    use bson::{Bson, RawBsonRef};
    Ok(match value {
        RawBsonRef::Document(d) => Bson::Document(raw_to_document(d)?),
        RawBsonRef::Array(a) => Bson::Array(
            a.into_iter()
                .map(|v| v.and_then(raw_to_bson))
                .collect::<bson::error::Result<_>>()?,
        ),
        RawBsonRef::String(s) => Bson::String(s.to_owned()),
        RawBsonRef::Int32(v) => Bson::Int32(v),
        RawBsonRef::Int64(v) => Bson::Int64(v),
        RawBsonRef::Double(v) => Bson::Double(v),
        RawBsonRef::Boolean(v) => Bson::Boolean(v),
        RawBsonRef::Null => Bson::Null,
        RawBsonRef::ObjectId(v) => Bson::ObjectId(v),
        RawBsonRef::DateTime(v) => Bson::DateTime(v),
        RawBsonRef::Timestamp(v) => Bson::Timestamp(v),
        RawBsonRef::Decimal128(v) => Bson::Decimal128(v),
        // The rest (binary, regex, code, symbols, …) as the crate converts them.
        other => Bson::try_from(other)?,
    })
}

fn read_cstring(bytes: &[u8], at: usize) -> Result<(String, usize), WireError> {
    let rest = bytes.get(at..).ok_or(WireError::Truncated("cstring"))?;
    let nul = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or(WireError::InvalidCString)?;
    let s = std::str::from_utf8(&rest[..nul]).map_err(|_| WireError::InvalidCString)?;
    Ok((s.to_string(), at + nul + 1))
}

fn decode_op_msg(header: &MsgHeader, body: &[u8]) -> Result<OpMsg, WireError> {
    let flags = read_u32(body, 0)?;
    let unknown_required = flags & REQUIRED_FLAGS_MASK & !KNOWN_REQUIRED_FLAGS;
    if unknown_required != 0 {
        return Err(WireError::IllegalFlags(unknown_required));
    }
    let mut end = body.len();
    if flags & FLAG_CHECKSUM_PRESENT != 0 {
        if body.len() < 8 {
            return Err(WireError::Truncated("checksum"));
        }
        end -= 4;
        let expected = read_u32(body, end)?;
        // The checksum covers the whole message, header included.
        let mut hasher = Crc32c::new();
        hasher.update(&header.length.to_le_bytes());
        hasher.update(&header.request_id.to_le_bytes());
        hasher.update(&header.response_to.to_le_bytes());
        hasher.update(&header.op_code.to_le_bytes());
        hasher.update(&body[..end]);
        if hasher.finish() != expected {
            return Err(WireError::ChecksumMismatch);
        }
    }
    let sections = &body[..end];
    let mut pos = 4;
    let mut main: Option<Document> = None;
    let mut body_count = 0;
    let mut sequences: Vec<(String, Vec<Document>)> = Vec::new();
    let mut body_updates: Option<RawBatch> = None;
    let mut sequence_updates: Option<RawBatch> = None;
    while pos < sections.len() {
        let kind = sections[pos];
        pos += 1;
        match kind {
            0 => {
                let (doc, batch, next) = read_body(sections, pos)?;
                body_count += 1;
                main = Some(doc);
                body_updates = batch;
                pos = next;
            }
            1 => {
                let size = read_i32(sections, pos)?;
                if size < 5 {
                    return Err(WireError::Truncated("document sequence"));
                }
                let seq_end = pos
                    .checked_add(size as usize)
                    .filter(|e| *e <= sections.len())
                    .ok_or(WireError::Truncated("document sequence"))?;
                let (identifier, mut at) = read_cstring(&sections[..seq_end], pos + 4)?;
                // An `update`'s statements (after its body, as drivers send them) stay raw.
                let raw = identifier == "updates"
                    && main
                        .as_ref()
                        .is_some_and(|b| b.keys().next().is_some_and(|k| k == "update"));
                let duplicate = |id: &str| {
                    sequences.iter().any(|(s, _)| s == id)
                        || (id == "updates" && sequence_updates.is_some())
                };
                if raw {
                    let start = at;
                    let mut docs = Vec::new();
                    let mut replacements = Vec::new();
                    while at < seq_end {
                        let (slice, next) = document_bytes(&sections[..seq_end], at)?;
                        let replacement =
                            match bson::RawDocument::from_bytes(slice).and_then(check_statement) {
                                Ok(r) => r,
                                Err(_) => {
                                    reference_decode(slice)?;
                                    None
                                }
                            };
                        replacements.push(replacement);
                        docs.push(at - start..next - start);
                        at = next;
                    }
                    if duplicate(&identifier) {
                        return Err(WireError::DuplicateSequence(identifier));
                    }
                    sequence_updates = Some(RawBatch {
                        bytes: sections[start..seq_end].to_vec(),
                        docs,
                        replacements,
                    });
                } else {
                    let mut docs = Vec::new();
                    while at < seq_end {
                        let (doc, next) = read_document(&sections[..seq_end], at)?;
                        docs.push(doc);
                        at = next;
                    }
                    if duplicate(&identifier) {
                        return Err(WireError::DuplicateSequence(identifier));
                    }
                    sequences.push((identifier, docs));
                }
                pos = seq_end;
            }
            other => return Err(WireError::UnknownSectionKind(other)),
        }
    }
    if body_count != 1 {
        return Err(WireError::BodyCount(body_count));
    }
    // A sequence replaces a field of the body of the same name.
    let raw_updates = if sequences.iter().any(|(id, _)| id == "updates") {
        None
    } else {
        sequence_updates.or(body_updates)
    };
    Ok(OpMsg {
        flags,
        body: main.expect("body_count == 1"),
        sequences,
        raw_updates,
    })
}

fn decode_op_query(body: &[u8]) -> Result<OpQuery, WireError> {
    let flags = read_i32(body, 0)?;
    let (full_collection_name, pos) = read_cstring(body, 4)?;
    let number_to_skip = read_i32(body, pos)?;
    let number_to_return = read_i32(body, pos + 4)?;
    let (query, _after) = read_document(body, pos + 8)?;
    Ok(OpQuery {
        flags,
        full_collection_name,
        number_to_skip,
        number_to_return,
        query,
    })
}

fn write_header(out: &mut Vec<u8>, request_id: i32, response_to: i32, op_code: i32) {
    out.extend_from_slice(&0i32.to_le_bytes()); // length, patched at the end
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&response_to.to_le_bytes());
    out.extend_from_slice(&op_code.to_le_bytes());
}

fn patch_length(out: &mut [u8]) {
    let len = out.len() as i32;
    out[0..4].copy_from_slice(&len.to_le_bytes());
}

/// An OP_MSG reply: one kind-0 section, no checksum (PyMongo rejects anything else).
pub fn encode_op_msg_reply(request_id: i32, response_to: i32, body: &Document) -> Vec<u8> {
    // Sized up front: large cursor batches would otherwise grow the buffer many times.
    let mut out = Vec::with_capacity(HEADER_LEN + 5 + crate::store::bson_size(body));
    write_header(&mut out, request_id, response_to, OP_MSG);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    if crate::store::encode_document(body, &mut out).is_none() {
        body.to_writer(&mut out)
            .expect("writing BSON to a Vec cannot fail");
    }
    patch_length(&mut out);
    out
}

/// [`encode_op_msg_reply`] of a body whose top-level field `key` is the array `array`, encoded
/// apart ([`crate::commands::Outcome::ReplyWithArray`]): the body's own value of that field
/// is a placeholder.
pub fn encode_op_msg_reply_with_array(
    request_id: i32,
    response_to: i32,
    body: &Document,
    key: &str,
    array: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 5 + crate::store::bson_size(body) + array.len());
    write_header(&mut out, request_id, response_to, OP_MSG);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    if crate::store::encode_document_with_array(body, key, array, &mut out).is_none() {
        let mut body = body.clone();
        crate::store::set_value_at_path(&mut body, key, array_from_bytes(array));
        return encode_op_msg_reply(request_id, response_to, &body);
    }
    patch_length(&mut out);
    out
}

/// The array whose BSON bytes are `bytes` (encoded by the simulator itself).
pub fn array_from_bytes(bytes: &[u8]) -> bson::Bson {
    let raw = bson::RawDocument::from_bytes(bytes).expect("an array the simulator encoded");
    bson::Bson::Array(
        raw.into_iter()
            .map(|element| {
                element
                    .and_then(|(_, v)| raw_to_bson(v))
                    .expect("an array the simulator encoded")
            })
            .collect(),
    )
}

/// An OP_MSG reply whose body is already encoded BSON (avoids re-encoding large batches).
pub fn encode_op_msg_reply_raw(request_id: i32, response_to: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 5 + body.len());
    write_header(&mut out, request_id, response_to, OP_MSG);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    out.extend_from_slice(body);
    patch_length(&mut out);
    out
}

/// The OP_REPLY answer to a legacy OP_QUERY handshake: exactly one document.
pub fn encode_op_reply(request_id: i32, response_to: i32, doc: &Document) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_header(&mut out, request_id, response_to, OP_REPLY);
    out.extend_from_slice(&0i32.to_le_bytes()); // responseFlags
    out.extend_from_slice(&0i64.to_le_bytes()); // cursorID
    out.extend_from_slice(&0i32.to_le_bytes()); // startingFrom
    out.extend_from_slice(&1i32.to_le_bytes()); // numberReturned
    doc.to_writer(&mut out)
        .expect("writing BSON to a Vec cannot fail");
    patch_length(&mut out);
    out
}

/// Builds an OP_MSG request (used by tests and fuzzing to produce valid inputs).
pub fn encode_op_msg_request(
    request_id: i32,
    flags: u32,
    body: &Document,
    sequences: &[(&str, Vec<Document>)],
) -> Vec<u8> {
    let mut out = Vec::new();
    write_header(&mut out, request_id, 0, OP_MSG);
    out.extend_from_slice(&flags.to_le_bytes());
    out.push(0);
    body.to_writer(&mut out).expect("vec write");
    for (identifier, docs) in sequences {
        out.push(1);
        let start = out.len();
        out.extend_from_slice(&0i32.to_le_bytes());
        out.extend_from_slice(identifier.as_bytes());
        out.push(0);
        for d in docs {
            d.to_writer(&mut out).expect("vec write");
        }
        let size = (out.len() - start) as i32;
        out[start..start + 4].copy_from_slice(&size.to_le_bytes());
    }
    if flags & FLAG_CHECKSUM_PRESENT != 0 {
        let len = out.len() as i32 + 4;
        out[0..4].copy_from_slice(&len.to_le_bytes());
        let mut h = Crc32c::new();
        h.update(&out);
        let crc = h.finish();
        out.extend_from_slice(&crc.to_le_bytes());
    } else {
        patch_length(&mut out);
    }
    out
}

/// CRC-32C (Castagnoli), as OP_MSG checksums use.
pub struct Crc32c {
    state: u32,
}

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut j = 0;
        while j < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            j += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

impl Crc32c {
    pub fn new() -> Self {
        Self { state: !0 }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        let mut crc = self.state;
        for b in bytes {
            crc = CRC32C_TABLE[((crc ^ *b as u32) & 0xff) as usize] ^ (crc >> 8);
        }
        self.state = crc;
    }

    pub fn finish(&self) -> u32 {
        !self.state
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Bson};

    fn split(msg: &[u8]) -> (MsgHeader, &[u8]) {
        let header = MsgHeader::parse(msg[..16].try_into().unwrap());
        (header, &msg[16..])
    }

    #[test]
    fn crc32c_known_vector() {
        let mut h = Crc32c::new();
        h.update(b"123456789");
        assert_eq!(h.finish(), 0xE306_9283);
    }

    #[test]
    fn op_msg_with_sequences_round_trips() {
        let body = doc! {"insert": "c", "$db": "d"};
        let docs = vec![doc! {"_id": 1}, doc! {"_id": 2}];
        let msg = encode_op_msg_request(7, 0, &body, &[("documents", docs.clone())]);
        let (header, rest) = split(&msg);
        assert_eq!(header.length as usize, msg.len());
        let Request::Msg(m) = decode_request(&header, rest).unwrap() else {
            panic!()
        };
        assert_eq!(m.body, body);
        assert_eq!(m.sequences, vec![("documents".to_string(), docs)]);
        let cmd = m.into_command();
        assert_eq!(cmd.get_array("documents").unwrap().len(), 2);
    }

    #[test]
    fn checksum_verified_and_rejected_when_wrong() {
        let body = doc! {"ping": 1, "$db": "admin"};
        let mut msg = encode_op_msg_request(1, FLAG_CHECKSUM_PRESENT, &body, &[]);
        let (header, rest) = split(&msg);
        assert!(decode_request(&header, rest).is_ok());
        let last = msg.len() - 1;
        msg[last] ^= 0xff;
        let (header, rest) = split(&msg);
        assert_eq!(
            decode_request(&header, rest),
            Err(WireError::ChecksumMismatch)
        );
    }

    #[test]
    fn unknown_required_flag_rejected() {
        let msg = encode_op_msg_request(1, 1 << 5, &doc! {"ping": 1}, &[]);
        let (header, rest) = split(&msg);
        assert_eq!(
            decode_request(&header, rest),
            Err(WireError::IllegalFlags(1 << 5))
        );
    }

    #[test]
    fn two_bodies_rejected() {
        let mut msg = encode_op_msg_request(1, 0, &doc! {"ping": 1}, &[]);
        msg.push(0);
        doc! {"ping": 2}.to_writer(&mut msg).unwrap();
        let len = msg.len() as i32;
        msg[0..4].copy_from_slice(&len.to_le_bytes());
        let (header, rest) = split(&msg);
        assert_eq!(decode_request(&header, rest), Err(WireError::BodyCount(2)));
    }

    #[test]
    fn bad_lengths_rejected() {
        let h = MsgHeader {
            length: 10,
            request_id: 0,
            response_to: 0,
            op_code: OP_MSG,
        };
        assert!(h.body_len().is_err());
        let h = MsgHeader {
            length: 60_000_000,
            ..h
        };
        assert!(h.body_len().is_err());
    }

    #[test]
    fn op_query_decodes() {
        let mut msg = Vec::new();
        write_header(&mut msg, 3, 0, OP_QUERY);
        msg.extend_from_slice(&0i32.to_le_bytes());
        msg.extend_from_slice(b"admin.$cmd\0");
        msg.extend_from_slice(&0i32.to_le_bytes());
        msg.extend_from_slice(&(-1i32).to_le_bytes());
        doc! {"ismaster": 1, "helloOk": true}
            .to_writer(&mut msg)
            .unwrap();
        patch_length(&mut msg);
        let (header, rest) = split(&msg);
        let Request::Query(q) = decode_request(&header, rest).unwrap() else {
            panic!()
        };
        assert_eq!(q.full_collection_name, "admin.$cmd");
        assert_eq!(q.number_to_return, -1);
        assert_eq!(q.query.get_i32("ismaster").unwrap(), 1);
    }

    #[test]
    fn reply_has_one_section_and_no_checksum() {
        let reply = encode_op_msg_reply(5, 9, &doc! {"ok": 1.0});
        let (header, rest) = split(&reply);
        assert_eq!(header.response_to, 9);
        assert_eq!(header.op_code, OP_MSG);
        assert_eq!(read_u32(rest, 0).unwrap(), 0);
        assert_eq!(rest[4], 0);
        let (doc, end) = read_document(rest, 5).unwrap();
        assert_eq!(end, rest.len());
        assert_eq!(doc, doc! {"ok": 1.0});
    }

    fn update_command() -> Document {
        doc! {
            "update": "c",
            "updates": [
                {"q": {"_id": 1}, "u": {"_id": 1, "s": "x", "arr": [1, {"a": "b"}], "js": Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope { code: "f".into(), scope: doc! {"x": 1} })}, "upsert": true},
                {"q": {}, "u": {"$set": {"a": 1}}, "multi": true},
            ],
            "ordered": true,
            "$db": "d",
        }
    }

    /// The [`ReplaceById`] of a statement as its converted fields say (the decoding's must be
    /// the same).
    fn replacement_of(stmt: &Document) -> Option<ReplaceById> {
        let shape = stmt
            .keys()
            .all(|k| matches!(k.as_str(), "q" | "u" | "upsert" | "multi"));
        let (Ok(q), Ok(u)) = (stmt.get_document("q"), stmt.get_document("u")) else {
            return None;
        };
        let replacement = u.keys().next().is_some_and(|k| !k.starts_with('$'));
        let multi = stmt.get_bool("multi").unwrap_or(false);
        match q.get("_id") {
            Some(id) if shape && q.len() == 1 && replacement && !multi => Some(ReplaceById {
                id: id.clone(),
                replacement: u.clone(),
                upsert: stmt.get_bool("upsert").unwrap_or(false),
            }),
            _ => None,
        }
    }

    /// What a body decodes to (its raw `updates` put back), or the error's text; the
    /// statements converted as replacements by `_id` must be those of that shape.
    fn body_as_decoded(bytes: &[u8]) -> Result<String, String> {
        match read_body(bytes, 0) {
            Ok((mut doc, batch, _)) => {
                if let Some(mut b) = batch.clone() {
                    let replacements = b.take_replacements();
                    for (i, r) in replacements.into_iter().enumerate() {
                        assert_eq!(
                            r.map(|r| *r),
                            replacement_of(&b.statement(i)),
                            "statement {i}"
                        );
                    }
                }
                let updates = batch
                    .map(|b| b.to_array())
                    .or_else(|| doc.remove("updates"));
                Ok(format!("{doc:?} {updates:?}"))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The same with `Document::from_reader` alone (the decoding before raw batches).
    fn body_as_reference(bytes: &[u8]) -> Result<String, String> {
        match reference_decode(bytes) {
            Ok(mut doc) => {
                let updates = doc.remove("updates");
                Ok(format!("{doc:?} {updates:?}"))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn update_statements_stay_raw_in_body_and_sequence() {
        let cmd = update_command();
        let msg = encode_op_msg_request(1, 0, &cmd, &[]);
        let (header, rest) = split(&msg);
        let Request::Msg(m) = decode_request(&header, rest).unwrap() else {
            panic!()
        };
        let batch = m.raw_updates.clone().expect("kept raw");
        assert_eq!(batch.len(), 2);
        assert!(!m.body.contains_key("updates"));
        assert_eq!(
            Bson::Array(vec![
                Bson::Document(batch.statement(0)),
                Bson::Document(batch.statement(1))
            ]),
            cmd.get("updates").unwrap().clone()
        );
        let mut back = m.into_command();
        let mut want = cmd.clone();
        assert_eq!(back.remove("updates"), want.remove("updates"));
        assert_eq!(back, want);

        // As a document sequence after the body (what drivers send).
        let mut body = cmd.clone();
        let Some(Bson::Array(stmts)) = body.remove("updates") else {
            panic!()
        };
        let stmts: Vec<Document> = stmts
            .into_iter()
            .map(|s| s.as_document().unwrap().clone())
            .collect();
        let msg = encode_op_msg_request(1, 0, &body, &[("updates", stmts.clone())]);
        let (header, rest) = split(&msg);
        let Request::Msg(m) = decode_request(&header, rest).unwrap() else {
            panic!()
        };
        assert!(m.sequences.is_empty());
        let (parts, batch) = m.clone().into_parts();
        assert_eq!(parts, body);
        assert_eq!(batch.unwrap().statement(1), stmts[1]);
        assert_eq!(m.into_command().get_array("updates").unwrap().len(), 2);

        // A non-document statement: nothing raw, the command as it came.
        let odd = doc! {"update": "c", "updates": [{"q": {}, "u": {}}, 5], "$db": "d"};
        let msg = encode_op_msg_request(1, 0, &odd, &[]);
        let (header, rest) = split(&msg);
        let Request::Msg(m) = decode_request(&header, rest).unwrap() else {
            panic!()
        };
        assert!(m.raw_updates.is_none());
        assert_eq!(m.into_command(), odd);

        // Not an update: an `updates` field is an ordinary field.
        let other = doc! {"find": "c", "updates": [{"a": 1}], "$db": "d"};
        let msg = encode_op_msg_request(1, 0, &other, &[]);
        let (header, rest) = split(&msg);
        let Request::Msg(m) = decode_request(&header, rest).unwrap() else {
            panic!()
        };
        assert!(m.raw_updates.is_none());
        assert_eq!(m.body, other);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Decoding a body (raw `updates` included) accepts and refuses exactly what
        /// `Document::from_reader` does, with the same documents and the same errors.
        #[test]
        fn body_decoding_matches_from_reader(flips in proptest::collection::vec((0usize..1000, proptest::prelude::any::<u8>()), 0..6)) {
            let mut bytes = update_command().to_vec().unwrap();
            let n = bytes.len();
            for (at, v) in flips { bytes[4 + at % (n - 4)] = v; }
            proptest::prop_assert_eq!(body_as_decoded(&bytes), body_as_reference(&bytes));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Nothing panics on arbitrary input, whatever the header claims.
        #[test]
        fn decoder_never_panics(op in proptest::prop_oneof![proptest::strategy::Just(OP_MSG), proptest::strategy::Just(OP_QUERY), proptest::prelude::any::<i32>()],
                                body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let header = MsgHeader { length: body.len() as i32 + 16, request_id: 1, response_to: 0, op_code: op };
            let _ = decode_request(&header, &body);
        }

        /// Mutations of a valid message never panic either (reaches deeper decoder states).
        #[test]
        fn mutated_valid_messages_never_panic(flips in proptest::collection::vec((0usize..200, proptest::prelude::any::<u8>()), 1..8),
                                              truncate in 0usize..200) {
            let mut msg = encode_op_msg_request(1, 0, &bson::doc!{"insert": "c", "$db": "d"}, &[("documents", vec![bson::doc!{"_id": 1, "a": "x"}])]);
            for (at, v) in flips { let n = msg.len(); msg[16 + at % (n - 16)] = v; }
            let keep = msg.len().saturating_sub(truncate % 40);
            msg.truncate(keep.max(16));
            let header = MsgHeader { length: msg.len() as i32, request_id: 1, response_to: 0, op_code: OP_MSG };
            let _ = decode_request(&header, &msg[16..]);
        }
    }
}

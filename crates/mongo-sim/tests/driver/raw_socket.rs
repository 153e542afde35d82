//! The wire protocol without a driver: OP_QUERY handshake, moreToCome, checksums, reply
//! framing, malformed and oversized messages.

use std::time::Duration;

use bson::{doc, Document};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::common::*;

const OP_REPLY: i32 = 1;
const OP_QUERY: i32 = 2004;
const OP_MSG: i32 = 2013;

struct Reply {
    request_id: i32,
    response_to: i32,
    op_code: i32,
    body: Vec<u8>,
}

fn header(len: usize, request_id: i32, op: i32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(len as i32).to_le_bytes());
    v.extend_from_slice(&request_id.to_le_bytes());
    v.extend_from_slice(&0i32.to_le_bytes());
    v.extend_from_slice(&op.to_le_bytes());
    v
}

fn bson_bytes(d: &Document) -> Vec<u8> {
    let mut v = Vec::new();
    d.to_writer(&mut v).unwrap();
    v
}

/// CRC-32C, written independently of the simulator's.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for b in data {
        crc ^= *b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn op_msg(
    request_id: i32,
    flags: u32,
    body: &Document,
    seqs: &[(&str, &[Document])],
    checksum: bool,
) -> Vec<u8> {
    let mut payload = Vec::new();
    let flags = flags | if checksum { 1 } else { 0 };
    payload.extend_from_slice(&flags.to_le_bytes());
    payload.push(0);
    payload.extend(bson_bytes(body));
    for (id, docs) in seqs {
        let mut sec = Vec::new();
        sec.extend_from_slice(id.as_bytes());
        sec.push(0);
        for d in *docs {
            sec.extend(bson_bytes(d));
        }
        payload.push(1);
        payload.extend_from_slice(&((sec.len() + 4) as i32).to_le_bytes());
        payload.extend(sec);
    }
    let total = 16 + payload.len() + if checksum { 4 } else { 0 };
    let mut msg = header(total, request_id, OP_MSG);
    msg.extend(payload);
    if checksum {
        let crc = crc32c(&msg);
        msg.extend_from_slice(&crc.to_le_bytes());
    }
    msg
}

fn op_query(request_id: i32, ns: &str, query: &Document) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&0i32.to_le_bytes());
    payload.extend_from_slice(ns.as_bytes());
    payload.push(0);
    payload.extend_from_slice(&0i32.to_le_bytes());
    payload.extend_from_slice(&(-1i32).to_le_bytes());
    payload.extend(bson_bytes(query));
    let mut msg = header(16 + payload.len(), request_id, OP_QUERY);
    msg.extend(payload);
    msg
}

async fn connect(sim: &mongo_sim::SimHandle) -> TcpStream {
    TcpStream::connect(sim.addr()).await.unwrap()
}

/// Reads one reply; `None` when the server closed the connection.
async fn read_reply(s: &mut TcpStream) -> Option<Reply> {
    let mut h = [0u8; 16];
    match tokio::time::timeout(EVENT_TIMEOUT, s.read_exact(&mut h))
        .await
        .expect("reply in time")
    {
        Ok(_) => {}
        Err(_) => return None,
    }
    let int = |i: usize| i32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = int(0) as usize;
    assert!(len > 16 && len <= 48_000_000, "bad reply length {len}");
    let mut body = vec![0u8; len - 16];
    s.read_exact(&mut body).await.ok()?;
    Some(Reply {
        request_id: int(4),
        response_to: int(8),
        op_code: int(12),
        body,
    })
}

/// Checks the framing of an OP_MSG reply (flags 0, exactly one kind-0 section, no checksum)
/// and returns its document.
fn op_msg_reply_doc(r: &Reply) -> Document {
    assert_eq!(r.op_code, OP_MSG);
    let flags = u32::from_le_bytes(r.body[0..4].try_into().unwrap());
    assert_eq!(
        flags, 0,
        "reply flags must be 0 (no checksum, no moreToCome)"
    );
    assert_eq!(r.body[4], 0, "first section must be kind 0");
    let doc_len = i32::from_le_bytes(r.body[5..9].try_into().unwrap()) as usize;
    assert_eq!(
        5 + doc_len,
        r.body.len(),
        "exactly one section, nothing after it"
    );
    Document::from_reader(&r.body[5..]).unwrap()
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(EVENT_TIMEOUT, s.read(&mut b))
            .await
            .expect("close in time"),
        Ok(0) | Err(_)
    )
}

async fn ping_works(sim: &mongo_sim::SimHandle) {
    let mut s = connect(sim).await;
    s.write_all(&op_msg(
        77,
        0,
        &doc! {"ping": 1, "$db": "admin"},
        &[],
        false,
    ))
    .await
    .unwrap();
    let r = read_reply(&mut s).await.expect("reply");
    assert_eq!(r.response_to, 77);
    assert_eq!(op_msg_reply_doc(&r).get_f64("ok").unwrap(), 1.0);
}

#[tokio::test]
async fn op_query_is_master_gets_op_reply() {
    bounded(async {
        let sim = start().await;
        let mut s = connect(&sim).await;
        s.write_all(&op_query(
            11,
            "admin.$cmd",
            &doc! {"ismaster": 1, "helloOk": true, "client": {"application": {"name": "raw"}}},
        ))
        .await
        .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        assert_eq!(r.op_code, OP_REPLY);
        assert_eq!(r.response_to, 11);
        assert_ne!(r.request_id, 0);
        let flags = i32::from_le_bytes(r.body[0..4].try_into().unwrap());
        let cursor_id = i64::from_le_bytes(r.body[4..12].try_into().unwrap());
        let starting_from = i32::from_le_bytes(r.body[12..16].try_into().unwrap());
        let number_returned = i32::from_le_bytes(r.body[16..20].try_into().unwrap());
        assert_eq!(
            (flags & 2, cursor_id, starting_from, number_returned),
            (0, 0, 0, 1)
        );
        let d = Document::from_reader(&r.body[20..]).unwrap();
        assert!(d.get_bool("ismaster").unwrap());
        assert!(d.get_bool("helloOk").unwrap());
        assert_eq!(d.get_f64("ok").unwrap(), 1.0);
        assert_eq!(d.get_str("setName").unwrap(), "rs0");
        assert!(d.get_i32("maxWireVersion").unwrap() >= 17);
        // `$query`-wrapped form and the camel-case name work too.
        s.write_all(&op_query(
            12,
            "admin.$cmd",
            &doc! {"$query": {"isMaster": 1}, "$readPreference": {"mode": "primary"}},
        ))
        .await
        .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        assert_eq!(r.response_to, 12);
        let d = Document::from_reader(&r.body[20..]).unwrap();
        assert!(d.get_bool("ismaster").unwrap());
        // Any other command over OP_QUERY is refused (352), as on 6.0+ servers.
        s.write_all(&op_query(13, "admin.$cmd", &doc! {"ping": 1}))
            .await
            .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        let d = Document::from_reader(&r.body[20..]).unwrap();
        assert_eq!(d.get_f64("ok").unwrap(), 0.0);
        assert_eq!(d.get_i32("code").unwrap(), 352);
        // After the legacy handshake, OP_MSG on the same connection.
        s.write_all(&op_msg(
            14,
            0,
            &doc! {"ping": 1, "$db": "admin"},
            &[],
            false,
        ))
        .await
        .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        assert_eq!(r.response_to, 14);
        op_msg_reply_doc(&r);
    })
    .await
}

#[tokio::test]
async fn more_to_come_requests_get_no_reply() {
    bounded(async {
        let sim = start().await;
        let mut s = connect(&sim).await;
        let more_to_come = 1 << 1;
        s.write_all(&op_msg(
            1,
            more_to_come,
            &doc! {"ping": 1, "$db": "admin"},
            &[],
            false,
        ))
        .await
        .unwrap();
        s.write_all(&op_msg(2, 0, &doc! {"ping": 1, "$db": "admin"}, &[], false))
            .await
            .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        assert_eq!(
            r.response_to, 2,
            "the moreToCome request must not be answered"
        );
        // An unacknowledged (w:0) insert sent with moreToCome is executed.
        s.write_all(&op_msg(
            3,
            more_to_come,
            &doc! {"insert": "c", "$db": "raw", "writeConcern": {"w": 0}},
            &[("documents", &[doc! {"_id": 1}, doc! {"_id": 2}])],
            false,
        ))
        .await
        .unwrap();
        s.write_all(&op_msg(
            4,
            0,
            &doc! {"count": "c", "$db": "raw"},
            &[],
            false,
        ))
        .await
        .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        assert_eq!(r.response_to, 4);
        assert_eq!(op_msg_reply_doc(&r).get_i32("n").unwrap(), 2);
    })
    .await
}

#[tokio::test]
async fn checksums_are_verified_and_never_sent() {
    bounded(async {
        let sim = start().await;
        let mut s = connect(&sim).await;
        s.write_all(&op_msg(5, 0, &doc! {"ping": 1, "$db": "admin"}, &[], true))
            .await
            .unwrap();
        let r = read_reply(&mut s)
            .await
            .expect("reply to a checksummed request");
        assert_eq!(r.response_to, 5);
        op_msg_reply_doc(&r);
        // With a kind-1 section and a checksum.
        s.write_all(&op_msg(
            6,
            0,
            &doc! {"insert": "c", "$db": "raw"},
            &[("documents", &[doc! {"_id": 1}])],
            true,
        ))
        .await
        .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        assert_eq!(op_msg_reply_doc(&r).get_i32("n").unwrap(), 1);
        // A wrong checksum closes the connection.
        let mut bad = op_msg(7, 0, &doc! {"ping": 1, "$db": "admin"}, &[], true);
        let last = bad.len() - 1;
        bad[last] ^= 0x5a;
        s.write_all(&bad).await.unwrap();
        assert!(closed(&mut s).await);
        ping_works(&sim).await;
    })
    .await
}

#[tokio::test]
async fn large_replies_are_single_section_op_msgs() {
    bounded(async {
        let sim = start().await;
        let mut s = connect(&sim).await;
        let docs: Vec<Document> = (0..500)
            .map(|i| doc! {"_id": i, "pad": "p".repeat(1000)})
            .collect();
        s.write_all(&op_msg(
            8,
            0,
            &doc! {"insert": "big", "$db": "raw"},
            &[("documents", &docs)],
            false,
        ))
        .await
        .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        assert_eq!(op_msg_reply_doc(&r).get_i32("n").unwrap(), 500);
        s.write_all(&op_msg(
            9,
            0,
            &doc! {"find": "big", "$db": "raw", "batchSize": 1000},
            &[],
            false,
        ))
        .await
        .unwrap();
        let r = read_reply(&mut s).await.expect("reply");
        let d = op_msg_reply_doc(&r);
        assert_eq!(
            d.get_document("cursor")
                .unwrap()
                .get_array("firstBatch")
                .unwrap()
                .len(),
            500
        );
        // An error reply is framed the same way.
        s.write_all(&op_msg(
            10,
            0,
            &doc! {"nope": 1, "$db": "admin"},
            &[],
            false,
        ))
        .await
        .unwrap();
        let d = op_msg_reply_doc(&read_reply(&mut s).await.expect("reply"));
        assert_eq!(d.get_i32("code").unwrap(), 59);
        assert_eq!(d.get_str("codeName").unwrap(), "CommandNotFound");
        assert_eq!(d.get_f64("ok").unwrap(), 0.0);
        // A missing $db is an error, not a crash.
        s.write_all(&op_msg(11, 0, &doc! {"ping": 1}, &[], false))
            .await
            .unwrap();
        let d = op_msg_reply_doc(&read_reply(&mut s).await.expect("reply"));
        assert_eq!(d.get_f64("ok").unwrap(), 0.0);
    })
    .await
}

#[tokio::test]
async fn malformed_and_oversized_messages_close_only_that_connection() {
    bounded(async {
        let sim = start().await;
        let mut healthy = connect(&sim).await;
        // Garbage after a valid header.
        let mut bad = connect(&sim).await;
        let mut msg = header(16 + 12, 1, OP_MSG);
        msg.extend_from_slice(&[0, 0, 0, 0, 0, 9, 0, 0, 0, 1, 2, 3]);
        bad.write_all(&msg).await.unwrap();
        assert!(closed(&mut bad).await);
        // An announced length beyond maxMessageSizeBytes.
        let mut big = connect(&sim).await;
        big.write_all(&header(100_000_000, 2, OP_MSG))
            .await
            .unwrap();
        assert!(closed(&mut big).await);
        // A negative / too small length.
        let mut small = connect(&sim).await;
        small.write_all(&header(3, 3, OP_MSG)).await.unwrap();
        assert!(closed(&mut small).await);
        // An unknown opcode.
        let mut unknown = connect(&sim).await;
        let mut msg = header(16 + 4, 4, 2002);
        msg.extend_from_slice(&[0; 4]);
        unknown.write_all(&msg).await.unwrap();
        assert!(closed(&mut unknown).await);
        // Two body sections.
        let mut two = connect(&sim).await;
        let mut m = op_msg(5, 0, &doc! {"ping": 1, "$db": "admin"}, &[], false);
        m.push(0);
        m.extend(bson_bytes(&doc! {"ping": 2}));
        let len = m.len() as i32;
        m[0..4].copy_from_slice(&len.to_le_bytes());
        two.write_all(&m).await.unwrap();
        assert!(closed(&mut two).await);
        // Random bytes on many connections.
        for seed in 0u32..20 {
            let mut c = connect(&sim).await;
            let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
            let len = 16 + (seed as usize * 13) % 200;
            let mut msg = header(
                len,
                seed as i32,
                if seed % 2 == 0 { OP_MSG } else { OP_QUERY },
            );
            for _ in 16..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                msg.push(x as u8);
            }
            let _ = c.write_all(&msg).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), c.read(&mut [0u8; 64])).await;
        }
        // The first connection and new ones keep working.
        healthy
            .write_all(&op_msg(6, 0, &doc! {"ping": 1, "$db": "admin"}, &[], false))
            .await
            .unwrap();
        let r = read_reply(&mut healthy)
            .await
            .expect("healthy connection still served");
        assert_eq!(r.response_to, 6);
        ping_works(&sim).await;
    })
    .await
}

#[tokio::test]
async fn oversized_document_is_rejected_with_10334() {
    bounded(async {
        let sim = start().await;
        let mut s = connect(&sim).await;
        let big = doc! {"_id": 1, "s": "z".repeat(16 * 1024 * 1024)};
        s.write_all(&op_msg(
            1,
            0,
            &doc! {"insert": "huge", "$db": "raw"},
            &[("documents", &[big, doc! {"_id": 2}])],
            false,
        ))
        .await
        .unwrap();
        let d = op_msg_reply_doc(&read_reply(&mut s).await.expect("reply"));
        assert_eq!(d.get_f64("ok").unwrap(), 1.0);
        assert_eq!(d.get_i32("n").unwrap(), 0);
        let e = d.get_array("writeErrors").unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        assert_eq!(e.get_i32("code").unwrap(), 10334);
        assert_eq!(e.get_i32("index").unwrap(), 0);
        // The driver refuses such a document before sending it; a document just under the
        // limit is accepted.
        let c = client(&sim).await;
        let ok = doc! {"_id": 3, "s": "z".repeat(16 * 1024 * 1024 - 100)};
        c.database("raw")
            .collection::<Document>("huge")
            .insert_one(ok)
            .await
            .unwrap();
    })
    .await
}

/// The same (lsid, txnNumber) sent on several connections at once (a retry racing its
/// original, with the session exactly as given: drivers would replace it) is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_of_one_statement_apply_once() {
    bounded(async {
        let sim = start().await;
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(connect(&sim).await);
        }
        for round in 0..25i64 {
            let lsid = doc! {"id": bson::Binary::from_uuid(bson::Uuid::new())};
            let cmd = doc! {"update": "race", "$db": "raw", "updates": [{"q": {"_id": round}, "u": {"$inc": {"n": 1}}, "upsert": true}], "lsid": lsid, "txnNumber": 1i64};
            let msg = op_msg(round as i32, 0, &cmd, &[], false);
            let tasks: Vec<_> = conns
                .drain(..)
                .map(|mut s| {
                    let msg = msg.clone();
                    tokio::spawn(async move {
                        s.write_all(&msg).await.unwrap();
                        let d = op_msg_reply_doc(&read_reply(&mut s).await.expect("reply"));
                        assert_eq!(d.get_i32("n").unwrap(), 1);
                        s
                    })
                })
                .collect();
            for t in tasks {
                conns.push(t.await.unwrap());
            }
        }
        let mut s = conns.pop().unwrap();
        s.write_all(&op_msg(1000, 0, &doc! {"count": "race", "$db": "raw", "query": {"n": 1}}, &[], false))
            .await
            .unwrap();
        let d = op_msg_reply_doc(&read_reply(&mut s).await.expect("reply"));
        assert_eq!(d.get_i32("n").unwrap(), 25, "a statement was applied more than once");
    })
    .await
}

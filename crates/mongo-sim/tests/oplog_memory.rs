//! Heap retained by the oplog per write: the document versions an entry keeps must stay
//! compact (the history of a busy collection is most of the simulator's memory).
//!
//! A counting global allocator (this test binary only) measures the live heap before and
//! after a run of `$set` updates of small documents through the same calls the `update`
//! command makes (apply, replace in the collection, oplog entry).

// The counting allocator is the only unsafe code: a pass-through to the system allocator.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use bson::{doc, Bson, Document};
use mongo_sim::{
    engine::change_to_op,
    oplog::{ClusterClock, Oplog},
    query::update::{apply_update_with_outcome, UpdateContext, UpdateOutcome, UpdateSpec},
    store::{Collection, Namespace},
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// What glibc's malloc takes for a request: 8 bytes of header, 16-byte granules, 32 minimum.
fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        LIVE.fetch_add(chunk(new_size), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const DOCS: i64 = 1_000;
const UPDATES: i64 = 20_000;

/// The document of the benchmark that measured the problem (~250 bytes of BSON).
fn customer(i: i64) -> Document {
    doc! {
        "_id": i, "name": format!("customer-{i:08}"), "email": format!("c{i}@x.com"),
        "balance": i as f64 / 100.0, "active": true, "tags": ["a", "b", "c"],
        "address": {"street": "x", "city": "y", "zip": "z"},
    }
}

#[test]
fn an_update_of_a_small_document_retains_under_a_kibibyte() {
    let mut coll = Collection::new(Namespace::new("perf", "e0"), Document::new()).unwrap();
    let mut oplog = Oplog::new(1_000_000);
    let mut clock = ClusterClock::default();
    for i in 0..DOCS {
        let change = coll.insert(customer(i), false).unwrap();
        oplog.append(clock.tick(), change_to_op(&coll, change), None, 0, false);
    }
    let specs: Vec<UpdateSpec> = (0..UPDATES)
        .map(|k| UpdateSpec::parse(&Bson::Document(doc! {"$set": {"visits": k}})).unwrap())
        .collect();
    let ctx = UpdateContext::new(bson::DateTime::now(), clock.current());
    let before = LIVE.load(Ordering::Relaxed);
    for (k, spec) in specs.iter().enumerate() {
        let id = Bson::Int64((k as i64 * 7919) % DOCS);
        let old = coll.get(&id).cloned().unwrap();
        let (new, outcome) = apply_update_with_outcome(&old, spec, &ctx).unwrap();
        drop(old);
        let UpdateOutcome::Delta(description) = outcome else {
            panic!("a $set is logged as a delta")
        };
        let change = coll.replace(new, Some(description), false).unwrap();
        oplog.append(clock.tick(), change_to_op(&coll, change), None, 0, false);
    }
    let after = LIVE.load(Ordering::Relaxed);
    drop(specs);
    let per_update = (after.saturating_sub(before)) as f64 / UPDATES as f64;
    eprintln!(
        "heap retained per update: {per_update:.0} bytes (BSON size of the document: {})",
        {
            let mut bytes = Vec::new();
            customer(0).to_writer(&mut bytes).unwrap();
            bytes.len()
        }
    );
    assert_eq!(oplog.len() as i64, DOCS + UPDATES);
    assert!(
        per_update <= 1024.0,
        "an update retains {per_update:.0} bytes of heap"
    );
}

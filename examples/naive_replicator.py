"""The naive replicator issue 11 compares mongo-syncd with: a PyMongo loop that reads the
source's change stream and applies each event with one acknowledged write.

Run by `examples/perf.rs` (not by hand):
    naive_replicator.py SOURCE_URI DEST_URI DB SOURCE_COLL DEST_COLL T I EVENTS
reads the change stream of DB.SOURCE_COLL from cluster time (T, I), applies EVENTS events to
DB.DEST_COLL (updates as $set/$unset of the event's fields, inserts and replaces as
replace-upserts, deletes as delete_one; majority write concern, as mongo-syncd writes), and
prints the rate in events per second.
"""

import sys
import time

from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.write_concern import WriteConcern


def main():
    source_uri, dest_uri, db, source_coll, dest_coll, t, i, events = sys.argv[1:9]
    events = int(events)
    source = MongoClient(source_uri)[db][source_coll]
    dest = MongoClient(dest_uri)[db].get_collection(
        dest_coll, write_concern=WriteConcern(w="majority", j=True)
    )
    applied = 0
    started = time.monotonic()
    with source.watch(start_at_operation_time=Timestamp(int(t), int(i))) as stream:
        for event in stream:
            op = event["operationType"]
            key = event["documentKey"]
            if op == "update":
                desc = event["updateDescription"]
                update = {}
                if desc.get("updatedFields"):
                    update["$set"] = desc["updatedFields"]
                if desc.get("removedFields"):
                    update["$unset"] = {f: "" for f in desc["removedFields"]}
                if update:
                    dest.update_one(key, update)
            elif op in ("insert", "replace"):
                dest.replace_one(key, event["fullDocument"], upsert=True)
            elif op == "delete":
                dest.delete_one(key)
            applied += 1
            if applied == events:
                break
    elapsed = time.monotonic() - started
    print(f"{applied / elapsed:.1f}")


if __name__ == "__main__":
    main()

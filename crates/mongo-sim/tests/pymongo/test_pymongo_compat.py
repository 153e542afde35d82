"""mongo-sim seen through PyMongo, used the way an application developer uses it."""

import threading
import time

import pymongo
import pytest
from bson import ObjectId, Timestamp
from pymongo import ASCENDING, DESCENDING, DeleteOne, InsertOne, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.write_concern import WriteConcern


def wait_for_change(stream, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        change = stream.try_next()
        if change is not None:
            return change
    raise AssertionError("no change event within the time bound")


# --- CRUD -----------------------------------------------------------------------------------


def test_insert_one_and_find_one(db):
    result = db.people.insert_one({"name": "ann", "age": 31})
    assert isinstance(result.inserted_id, ObjectId)
    doc = db.people.find_one({"_id": result.inserted_id})
    assert doc == {"_id": result.inserted_id, "name": "ann", "age": 31}
    assert list(doc.keys())[0] == "_id"


def test_find_with_filter_sort_projection_skip_limit(db):
    db.items.insert_many([{"_id": i, "kind": i % 3, "price": 100 - i} for i in range(30)])
    docs = list(
        db.items.find({"kind": 1, "price": {"$lt": 95}}, {"_id": 1, "price": 1})
        .sort("price", ASCENDING)
        .skip(1)
        .limit(3)
    )
    # kind 1 and price < 95: ids 7, 10, ..., 28 -> prices 93, 90, ..., 72; ascending, skip 1.
    assert docs == [{"_id": 25, "price": 75}, {"_id": 22, "price": 78}, {"_id": 19, "price": 81}]
    names = [d["_id"] for d in db.items.find({"_id": {"$in": [3, 1, 2]}}).sort([("kind", DESCENDING), ("_id", ASCENDING)])]
    assert names == [2, 1, 3]
    assert db.items.find_one({"price": {"$gte": 1000}}) is None


def test_update_operators_and_upsert(db):
    db.counters.insert_many([{"_id": "a", "n": 1, "tags": ["x"]}, {"_id": "b", "n": 2, "tags": []}])
    r = db.counters.update_one({"_id": "a"}, {"$inc": {"n": 5}, "$push": {"tags": "y"}})
    assert (r.matched_count, r.modified_count) == (1, 1)
    r = db.counters.update_many({}, {"$set": {"seen": True}})
    assert (r.matched_count, r.modified_count) == (2, 2)
    r = db.counters.update_one({"_id": "c"}, {"$setOnInsert": {"n": 0}, "$set": {"seen": False}}, upsert=True)
    assert r.upserted_id == "c"
    assert db.counters.find_one({"_id": "a"}) == {"_id": "a", "n": 6, "tags": ["x", "y"], "seen": True}
    assert db.counters.find_one({"_id": "c"}) == {"_id": "c", "n": 0, "seen": False}
    r = db.counters.update_one({"_id": "b"}, {"$unset": {"seen": ""}, "$addToSet": {"tags": "z"}})
    assert db.counters.find_one({"_id": "b"}) == {"_id": "b", "n": 2, "tags": ["z"]}


def test_replace_and_delete(db):
    db.c.insert_many([{"_id": i, "v": i} for i in range(5)])
    r = db.c.replace_one({"_id": 2}, {"replaced": True})
    assert r.modified_count == 1
    assert db.c.find_one({"_id": 2}) == {"_id": 2, "replaced": True}
    assert db.c.delete_one({"v": {"$gte": 3}}).deleted_count == 1
    assert db.c.delete_many({"v": {"$lt": 2}}).deleted_count == 2
    assert sorted(d["_id"] for d in db.c.find()) == [2, 4]


def test_find_one_and_update(db):
    db.seq.insert_one({"_id": "order", "value": 10})
    before = db.seq.find_one_and_update({"_id": "order"}, {"$inc": {"value": 1}})
    assert before["value"] == 10
    after = db.seq.find_one_and_update(
        {"_id": "order"}, {"$inc": {"value": 1}}, return_document=ReturnDocument.AFTER
    )
    assert after["value"] == 12
    created = db.seq.find_one_and_update(
        {"_id": "new"}, {"$set": {"value": 1}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert created == {"_id": "new", "value": 1}
    assert db.seq.find_one_and_delete({"_id": "new"}) == {"_id": "new", "value": 1}


def test_count_documents_and_distinct(db):
    db.c.insert_many([{"color": c, "n": i} for i, c in enumerate(["red", "blue", "red", "green", "red"])])
    assert db.c.count_documents({}) == 5
    assert db.c.count_documents({"color": "red"}) == 3
    assert db.c.count_documents({}, skip=1, limit=2) == 2
    assert db.c.estimated_document_count() == 5
    assert sorted(db.c.distinct("color")) == ["blue", "green", "red"]
    assert sorted(db.c.distinct("n", {"color": "red"})) == [0, 2, 4]


def test_aggregate_group(db):
    db.sales.insert_many([{"item": i % 2, "qty": i} for i in range(10)])
    out = list(db.sales.aggregate([{"$group": {"_id": "$item", "total": {"$sum": "$qty"}}}, {"$sort": {"_id": 1}}]))
    assert out == [{"_id": 0, "total": 20}, {"_id": 1, "total": 25}]


def test_bulk_write_ordered_and_unordered_with_duplicate(db):
    db.b.insert_one({"_id": 1})
    with pytest.raises(BulkWriteError) as info:
        db.b.bulk_write([InsertOne({"_id": 2}), InsertOne({"_id": 1}), InsertOne({"_id": 3})], ordered=True)
    details = info.value.details
    assert details["nInserted"] == 1
    assert details["writeErrors"][0]["code"] == 11000
    assert details["writeErrors"][0]["index"] == 1
    with pytest.raises(BulkWriteError) as info:
        db.b.bulk_write(
            [InsertOne({"_id": 1}), InsertOne({"_id": 4}), UpdateOne({"_id": 4}, {"$set": {"x": 1}}), DeleteOne({"_id": 2})],
            ordered=False,
        )
    details = info.value.details
    assert (details["nInserted"], details["nModified"], details["nRemoved"]) == (1, 1, 1)
    assert [e["index"] for e in details["writeErrors"]] == [0]
    result = db.b.bulk_write([ReplaceOne({"_id": 9}, {"v": 9}, upsert=True), InsertOne({"_id": 10})])
    assert result.upserted_ids == {0: 9}
    assert sorted(d["_id"] for d in db.b.find()) == [1, 4, 9, 10]


def test_cursor_with_small_batches_over_many_documents(db):
    db.many.insert_many([{"_id": i} for i in range(1000)])
    ids = [d["_id"] for d in db.many.find().sort("_id", ASCENDING).batch_size(10)]
    assert ids == list(range(1000))
    cursor = db.many.find().batch_size(5)
    first = [next(cursor)["_id"] for _ in range(7)]
    assert first == list(range(7))
    cursor.close()


def test_unacknowledged_writes(db):
    coll = db.get_collection("w0", write_concern=WriteConcern(w=0))
    for i in range(20):
        coll.insert_one({"_id": i})
    deadline = time.monotonic() + 10
    while db.w0.count_documents({}) < 20:
        assert time.monotonic() < deadline, "w:0 inserts never applied"
    assert db.w0.count_documents({}) == 20


# --- Indexes and catalog --------------------------------------------------------------------


def test_unique_index_raises_duplicate_key_error(db):
    name = db.users.create_index("email", unique=True)
    assert name == "email_1"
    db.users.insert_one({"email": "a@example.com"})
    with pytest.raises(DuplicateKeyError) as info:
        db.users.insert_one({"email": "a@example.com"})
    assert info.value.code == 11000
    info = db.users.index_information()
    assert info["email_1"]["unique"] is True
    db.users.drop_index("email_1")
    db.users.insert_one({"email": "a@example.com"})
    assert db.users.count_documents({}) == 2


def test_catalog(client, db):
    db.create_collection("made", capped=True, size=8192)
    db.implicit.insert_one({})
    assert set(db.list_collection_names()) == {"made", "implicit"}
    assert db.made.options()["capped"] is True
    assert db.name in client.list_database_names()
    db.drop_collection("implicit")
    assert db.list_collection_names() == ["made"]
    client.drop_database(db.name)
    assert db.name not in client.list_database_names()


# --- Change streams -------------------------------------------------------------------------


def test_change_stream_sees_inserts_and_updates(db):
    with db.events.watch(max_await_time_ms=200) as stream:
        db.events.insert_one({"_id": 1, "v": 1})
        db.events.update_one({"_id": 1}, {"$set": {"v": 2}})
        insert = wait_for_change(stream)
        update = wait_for_change(stream)
    assert insert["operationType"] == "insert"
    assert insert["fullDocument"] == {"_id": 1, "v": 1}
    assert insert["ns"] == {"db": db.name, "coll": "events"}
    assert update["operationType"] == "update"
    assert update["updateDescription"]["updatedFields"] == {"v": 2}
    assert isinstance(update["clusterTime"], Timestamp)


def test_change_stream_resume_after_saved_token(db):
    with db.events.watch(max_await_time_ms=200) as stream:
        for i in range(3):
            db.events.insert_one({"_id": i})
        first = wait_for_change(stream)
        token = first["_id"]
    db.events.insert_one({"_id": 3})
    with db.events.watch(resume_after=token, max_await_time_ms=200) as stream:
        ids = [wait_for_change(stream)["documentKey"]["_id"] for _ in range(3)]
    assert ids == [1, 2, 3]


def test_change_stream_resume_token_while_idle(db):
    with db.idle.watch(max_await_time_ms=300) as stream:
        assert stream.try_next() is None
        token = stream.resume_token
        assert token is not None
        deadline = time.monotonic() + 10
        while stream.resume_token == token:
            assert time.monotonic() < deadline, "the resume token never advanced while idle"
            assert stream.try_next() is None


def test_change_stream_full_document_update_lookup(db):
    db.docs.insert_one({"_id": 1, "a": 1, "b": 1})
    with db.docs.watch(full_document="updateLookup", max_await_time_ms=200) as stream:
        db.docs.update_one({"_id": 1}, {"$set": {"a": 2}})
        change = wait_for_change(stream)
    assert change["operationType"] == "update"
    assert change["fullDocument"] == {"_id": 1, "a": 2, "b": 1}


def test_change_stream_start_at_operation_time(client, db):
    db.t.insert_one({"_id": "before"})
    op_time = client.admin.command("ping")["operationTime"]
    db.t.insert_one({"_id": "after"})
    seen = []
    with db.t.watch(start_at_operation_time=op_time, max_await_time_ms=200) as stream:
        while not seen or seen[-1]["documentKey"] != {"_id": "after"}:
            seen.append(wait_for_change(stream))
    # Events at or after the operation time only: "before" is included only if it happened
    # exactly at that time (the ping's operationTime is the last write's time).
    assert all(c["clusterTime"] >= op_time for c in seen)
    assert [c["documentKey"]["_id"] for c in seen] in (["after"], ["before", "after"])


# --- Transactions ---------------------------------------------------------------------------


def test_with_transaction_commits_atomically(client, db):
    db.accounts.insert_many([{"_id": "a", "balance": 100}, {"_id": "b", "balance": 0}])

    def transfer(session):
        db.accounts.update_one({"_id": "a"}, {"$inc": {"balance": -30}}, session=session)
        assert db.accounts.find_one({"_id": "b"}, session=session)["balance"] == 0
        db.accounts.update_one({"_id": "b"}, {"$inc": {"balance": 30}}, session=session)
        # Outside the transaction nothing is visible yet.
        assert db.accounts.find_one({"_id": "a"})["balance"] == 100

    with db.accounts.watch(max_await_time_ms=200) as stream:
        with client.start_session() as session:
            session.with_transaction(transfer)
        first = wait_for_change(stream)
        second = wait_for_change(stream)
    assert {d["_id"]: d["balance"] for d in db.accounts.find()} == {"a": 70, "b": 30}
    assert first["clusterTime"] == second["clusterTime"]
    assert "lsid" in first and "txnNumber" in first


def test_transaction_abort_discards_writes(client, db):
    db.t.insert_one({"_id": 0})
    with client.start_session() as session:
        session.start_transaction()
        db.t.insert_one({"_id": 1}, session=session)
        db.t.delete_one({"_id": 0}, session=session)
        assert db.t.count_documents({}, session=session) == 1
        session.abort_transaction()
    assert [d["_id"] for d in db.t.find()] == [0]


def test_a_transaction_past_its_lifetime_limit_is_aborted(client, db):
    """MongoDB's transaction reaper: an open transaction older than
    transactionLifetimeLimitSeconds is aborted and frees its documents."""
    admin = client.admin
    assert admin.command("getParameter", 1, transactionLifetimeLimitSeconds=1)[
        "transactionLifetimeLimitSeconds"
    ] == 60
    with pytest.raises(OperationFailure) as low:
        admin.command("setParameter", 1, transactionLifetimeLimitSeconds=0)
    assert low.value.code == 2
    assert admin.command("setParameter", 1, transactionLifetimeLimitSeconds=1)["was"] == 60
    try:
        db.held.insert_one({"_id": 1, "n": 0})
        abandoned = client.start_session()
        abandoned.start_transaction()
        db.held.update_one({"_id": 1}, {"$set": {"n": 1}}, session=abandoned)
        deadline = time.monotonic() + 10
        while True:
            with client.start_session() as s:
                s.start_transaction()
                try:
                    db.held.update_one({"_id": 1}, {"$set": {"n": 2}}, session=s)
                    s.commit_transaction()
                    break
                except OperationFailure as e:
                    assert e.code == 112, e
                    s.abort_transaction()
            assert time.monotonic() < deadline, "the expired transaction still holds the document"
            time.sleep(0.1)
        with pytest.raises(OperationFailure) as gone:
            abandoned.commit_transaction()
        assert gone.value.code == 251
        abandoned.end_session()
        assert db.held.find_one({"_id": 1})["n"] == 2
    finally:
        admin.command("setParameter", 1, transactionLifetimeLimitSeconds=60)


def test_duplicate_key_aborts_the_transaction(client, db):
    db.txdup.insert_one({"_id": 1})
    with client.start_session() as session:
        session.start_transaction()
        with pytest.raises(DuplicateKeyError) as dup:
            db.txdup.insert_one({"_id": 1}, session=session)
        assert not dup.value.has_error_label("TransientTransactionError")
        with pytest.raises(OperationFailure) as nst:
            db.txdup.find_one({}, session=session)
        assert nst.value.code == 251
        assert nst.value.has_error_label("TransientTransactionError")
        with pytest.raises(OperationFailure) as commit:
            session.commit_transaction()
        assert commit.value.code == 251
    assert [d["_id"] for d in db.txdup.find()] == [1]


def test_with_transaction_does_not_retry_a_duplicate_key(client, db):
    db.txwt.insert_one({"_id": 1})
    calls = []

    def callback(session):
        calls.append(1)
        db.txwt.insert_one({"_id": 2}, session=session)
        db.txwt.insert_one({"_id": 1}, session=session)

    with client.start_session() as session:
        with pytest.raises(DuplicateKeyError):
            session.with_transaction(callback)
    assert calls == [1]
    assert [d["_id"] for d in db.txwt.find()] == [1]


def test_create_collection_and_index_in_with_transaction(client, db):
    def callback(session):
        db.create_collection("txnew", session=session, check_exists=False)
        db.txnew.create_index("k", unique=True, session=session)
        db.txnew.insert_one({"_id": 1, "k": 1}, session=session)
        assert "txnew" not in db.list_collection_names()

    with client.start_session() as session:
        session.with_transaction(callback)
    assert "txnew" in db.list_collection_names()
    assert sorted(db.txnew.index_information()) == ["_id_", "k_1"]
    with pytest.raises(DuplicateKeyError):
        db.txnew.insert_one({"_id": 2, "k": 1})


def test_drop_inside_a_transaction_is_refused(client, db):
    db.txdrop.insert_one({"_id": 1})
    with client.start_session() as session:
        session.start_transaction()
        with pytest.raises(OperationFailure) as refused:
            db.txdrop.drop(session=session)
        assert refused.value.code == 263
        with pytest.raises(OperationFailure) as commit:
            session.commit_transaction()
        assert commit.value.code == 251
    assert db.txdrop.count_documents({}) == 1


def test_unsatisfiable_write_concern_applies_the_write(db):
    from pymongo.errors import WriteConcernError

    coll = db.get_collection("wc5", write_concern=WriteConcern(w=5))
    with pytest.raises(WriteConcernError) as err:
        coll.insert_one({"_id": 1})
    assert err.value.code == 100
    assert err.value.details["codeName"] == "UnsatisfiableWriteConcern"
    assert db.wc5.find_one({"_id": 1}) == {"_id": 1}
    tagged = db.get_collection("wc5", write_concern=WriteConcern(w="nosuchtag"))
    with pytest.raises(WriteConcernError) as err:
        tagged.insert_one({"_id": 2})
    assert err.value.code == 79
    assert db.wc5.count_documents({}) == 2


def test_commit_with_unsatisfiable_write_concern(client, db):
    from pymongo.errors import WriteConcernError

    db.wctx.insert_one({"_id": 0})
    with client.start_session() as session:
        session.start_transaction(write_concern=WriteConcern(w=5))
        db.wctx.insert_one({"_id": 1}, session=session)
        with pytest.raises(WriteConcernError) as err:
            session.commit_transaction()
        assert err.value.code == 100
        assert not err.value.has_error_label("UnknownTransactionCommitResult")
    assert db.wctx.count_documents({}) == 2


# --- Fail points ----------------------------------------------------------------------------


def fail_point(client, mode, data):
    client.admin.command("configureFailPoint", "failCommand", mode=mode, data=data)


def fail_point_off(client):
    client.admin.command("configureFailPoint", "failCommand", mode="off")


def test_retryable_insert_after_close_connection_inserts_once(client, db):
    fail_point(client, {"times": 1}, {"failCommands": ["insert"], "closeConnection": True})
    try:
        db.retry.insert_one({"_id": "once"})
    finally:
        fail_point_off(client)
    assert db.retry.count_documents({"_id": "once"}) == 1


def test_retryable_update_after_lost_acknowledgement_applies_once(client, db):
    db.retry.insert_one({"_id": "n", "n": 0})
    client.admin.command(
        "configureFailPoint", "onPrimaryTransactionalWrite", mode={"times": 1}, data={"closeConnection": True}
    )
    try:
        db.retry.update_one({"_id": "n"}, {"$inc": {"n": 1}})
    finally:
        count = client.admin.command("configureFailPoint", "onPrimaryTransactionalWrite", mode="off")["count"]
    assert count == 1
    assert db.retry.find_one({"_id": "n"})["n"] == 1


def test_error_code_fail_point_surfaces_as_operation_failure(client, db):
    fail_point(client, {"times": 1}, {"failCommands": ["find"], "errorCode": 2})
    try:
        with pytest.raises(OperationFailure) as info:
            db.c.find_one({})
    finally:
        fail_point_off(client)
    assert info.value.code == 2
    assert db.c.find_one({}) is None


def test_block_connection_fail_point(client, db):
    client.admin.command("ping")
    fail_point(client, {"times": 1}, {"failCommands": ["ping"], "blockConnection": True, "blockTimeMS": 250})
    try:
        started = time.monotonic()
        client.admin.command("ping")
        assert time.monotonic() - started >= 0.24
    finally:
        fail_point_off(client)


# --- Validation helpers ---------------------------------------------------------------------


def test_db_hash(client, db):
    db.h.insert_many([{"_id": i, "v": i} for i in range(50)])
    first = db.command("dbHash")
    again = db.command("dbHash")
    assert first["md5"] == again["md5"]
    assert set(first["collections"]) == {"h"}
    db.h.update_one({"_id": 7}, {"$set": {"v": -1}})
    changed = db.command("dbHash")
    assert changed["md5"] != first["md5"]
    assert changed["collections"]["h"] != first["collections"]["h"]


def test_concurrent_clients(uri, db):
    def worker(t):
        c = pymongo.MongoClient(uri)
        try:
            c[db.name].conc.insert_many([{"_id": t * 1000 + i} for i in range(200)])
            for i in range(50):
                c[db.name].conc.update_one({"_id": t * 1000 + i}, {"$set": {"t": t}})
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert db.conc.count_documents({}) == 800
    assert db.conc.count_documents({"t": {"$exists": True}}) == 200
